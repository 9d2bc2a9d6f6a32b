"""The seed's trainer options (docs/math.md §2), each doing what the seed's train_gpt.py does: QAT's
threshold, grid widths and late start; the progressive crawler-loop schedule (switch steps, one compile
per variant, resume); starting from a weights file with fresh optimisers (RESUME_FROM); the initial
embedding std; WARMDOWN_ITERS; the TTT knobs; and train_alpha under a two-process gloo DDP run."""
import json

import pytest
import torch
from trainer_fixtures import (  # noqa: F401
    fast_train_config,
    kill_at_step,
    make_dataset,
    restore_threads,
    run_gloo,
    small_config,
)

import crawler.training.loop as trainer_mod
import train as train_cli
from crawler import CrawlerConfig, CrawlerGPT
from crawler.checkpoint import model_from_checkpoint, read_checkpoint
from crawler.config import PASSTHROUGH_NUMEL
from crawler.errors import SetupError
from crawler.model import CastedLinear
from crawler.optim import lr_multiplier
from crawler.quant.plan import QuantPlan
from crawler.runtime import DistContext
from crawler.training import TrainConfig, prepare_data, train
from crawler.training.schedule import LoopSchedule
from crawler.ttt import TTTConfig, legal_ttt_bpb, ttt_config_from_args
from kernels.modules import TOK_EMB_STD


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("options_data"))


@pytest.fixture(scope="module")
def data(dataset):
    return prepare_data(*dataset, 320, val_max_tokens=16 * 16 + 1)


class Recorder:
    """Appends train.log's lines to `lines` (train()'s `log`)."""

    def __init__(self):
        self.lines = []

    def __call__(self, msg):
        self.lines.append(msg)

    def text(self):
        return "\n".join(self.lines)


def run(data, *, model_config=None, out_dir=None, log=None, **tc):
    torch.set_num_threads(1)
    return train(model_config or small_config(), fast_train_config(**tc), data, out_dir=out_dir, ops="reference",
                 log=log or Recorder())


def spy_steps(monkeypatch) -> list[dict]:
    """Per optimiser step: its index, LR multiplier, crawler loops and whether QAT was on."""
    seen = []
    original = trainer_mod._Trainer.train_step

    def spy(self, step, multiplier):
        seen.append({"step": step, "multiplier": multiplier, "loops": self.model.active_loops,
                     "qat": any(m.qat for m in self.model.modules() if isinstance(m, CastedLinear))})
        return original(self, step, multiplier)

    monkeypatch.setattr(trainer_mod._Trainer, "train_step", spy)
    return seen


# ---- QAT ----------------------------------------------------------------------------------------------

def test_qat_threshold_is_one_field_and_the_quantiser_follows_it():
    assert TrainConfig().qat_small_numel == PASSTHROUGH_NUMEL == QuantPlan.__dataclass_fields__["small_numel"].default
    cpu = torch.device("cpu")

    def resolved(*argv):
        args = train_cli.build_parser().parse_args(list(argv))
        _, tc = train_cli.resolve_options(args, cpu)
        return tc.qat_small_numel, args.quant_small_numel

    assert resolved() == (0, 0)                                   # the demo: QAT acts on what it quantises
    assert resolved("--data-dir", "d") == (PASSTHROUGH_NUMEL, PASSTHROUGH_NUMEL)
    assert resolved("--qat-small-numel", "4096") == (4096, 4096)
    assert resolved("--quant-small-numel", "5") == (0, 5)


def test_qat_grid_per_role_and_threshold():
    torch.manual_seed(0)
    model = CrawlerGPT(small_config(), ops="reference")
    fc = model.flat_blocks[0].mlp.fc                              # 128 x 32 = 4096 weights
    q = model.flat_blocks[0].attn.c_q                             # 32 x 32 = 1024 weights
    assert model.configure_qat(bits=6, mlp_bits=4, small_numel=1024) == 10   # fc + mlp.proj of 5 blocks
    assert (fc.qat_bits, q.qat_bits) == (4, 0)
    assert model.configure_qat(bits=5, small_numel=0) == sum(isinstance(m, CastedLinear) for m in model.modules())
    model.set_qat(True)
    w = q.effective_weight().detach()
    codes = w / (q.weight.detach().abs().amax(1, keepdim=True) / 15)        # 5 bits: R = 15, grid [-16, 15]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= -16 and codes.round().max() == 15
    model.set_qat(False)
    assert torch.equal(q.effective_weight(), q.weight)


def test_late_qat_switches_on_when_the_multiplier_reaches_the_threshold(data, monkeypatch):
    seen = spy_steps(monkeypatch)
    log = Recorder()
    # 8 steps, warmdown over the last half: multipliers 1, 1, 1, 1, 1, .75, .5, .25
    run(data, iterations=8, warmdown_frac=0.5, late_qat_threshold=0.5, qat_small_numel=0, log=log)
    assert [s["multiplier"] for s in seen] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [s["qat"] for s in seen] == [False] * 6 + [True] * 2      # the seed: on once multiplier <= threshold
    assert "qat:late_start threshold=0.5 attn=6bit" in log.lines
    assert "late_qat:activated at step 6 scale=0.5000 threshold=0.5" in log.lines


def test_qat_state_is_logged_and_a_no_op_qat_says_so(data):
    log = Recorder()
    run(data, iterations=1, qat_mlp_bits=5, log=log)             # default threshold: no tiny matrix is that large
    assert "qat:enabled from step 0 attn=6bit, MLP=5bit" in log.lines
    assert any("no Linear weight has more than 65,536 elements" in line for line in log.lines)
    log = Recorder()
    run(data, iterations=1, qat=False, log=log)
    assert "qat:disabled" in log.lines


# ---- progressive crawler-loop schedule ----------------------------------------------------------------

def test_loop_schedule_parsing():
    s = LoopSchedule.parse("5:2, 2:1", crawler_loops=2)
    assert s.switches == ((2, 1), (5, 2)) and [s.loops_at(i) for i in range(7)] == [1, 1, 1, 1, 1, 2, 2]
    assert LoopSchedule.parse("", 2).loops_at(0) == 2 and LoopSchedule.parse("0:2,3:1", 2).variants() == [2, 1]
    for bad in ("2", "a:2", "3:0", "2:1,2:2"):
        with pytest.raises(SetupError, match="progressive_schedule"):
            LoopSchedule.parse(bad, 2)
    with pytest.raises(SetupError, match="has 2 crawler loop"):
        LoopSchedule.parse("3:3", 2)


def test_progressive_schedule_switches_at_the_given_steps(data, monkeypatch):
    seen = spy_steps(monkeypatch)
    log = Recorder()
    res = run(data, iterations=5, progressive_schedule="3:2", log=log)
    assert [s["loops"] for s in seen] == [1, 1, 1, 2, 2]
    assert "progressive:step 3 -> 2 crawler loops, depth=7" in log.lines
    assert res.model.active_loops == 2 and len(res.model.schedule) == 7
    # a run that ends on fewer loops is scored with all of them, as the seed does
    log = Recorder()
    res = run(data, iterations=2, progressive_schedule="4:2", log=log)
    assert "eval:restored full crawler loops=2, depth=7" in log.lines and res.model.active_loops == 2


def test_one_loop_variant_is_the_seeds_schedule_rebuilt_with_one_loop():
    torch.manual_seed(0)
    model = CrawlerGPT(small_config(xsa="pr1579"), ops="reference")
    model.set_active_loops(1)
    assert model.schedule == [("flat", 0, 0), ("crawler", 0, 0), ("crawler", 1, 0), ("flat", 1, 0), ("flat", 2, 0)]
    assert model.xsa_positions == {0, 1, 2} and model.ve_positions == (3, 4)    # VE: the last 2 positions


def test_progressive_variants_compile_once_each_during_the_warmup(data, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def counting_compile(model, **kwargs):
        def backend(graph, example_inputs):
            compiled.append(model.active_loops)
            return graph.forward
        return real_compile(model, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch, "compile", counting_compile)
    log = Recorder()
    run(data, iterations=4, warmup_steps=2, compile=True, progressive_schedule="2:2", log=log)
    assert compiled == [1, 2]                     # in the warm-up, and never again while training
    assert "warmup:precompile variant=2 loops, depth=7, qat on" in log.lines


def test_resume_keeps_the_schedule_and_late_qat(data, tmp_path, monkeypatch):
    """Killed after the loop switch and the QAT switch, resumed: bitwise the uninterrupted run."""
    options = dict(iterations=7, checkpoint_every=2, warmdown_frac=0.8, late_qat_threshold=0.95,
                   qat_small_numel=0, progressive_schedule="3:2")
    full = run(data, out_dir=tmp_path / "full", **options)
    restore = kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run(data, out_dir=tmp_path / "cut", **options)
    restore()
    state = read_checkpoint(tmp_path / "cut" / "checkpoint.pt", expect="training").contents
    assert state["step"] == 4 and state["qat_active"]
    seen = spy_steps(monkeypatch)
    resumed = train(small_config(), fast_train_config(**options), data, out_dir=tmp_path / "cut", ops="reference",
                    resume=tmp_path / "cut" / "checkpoint.pt", log=Recorder())
    assert [(s["loops"], s["qat"]) for s in seen] == [(2, True)] * 3
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in full.model.state_dict().items())


# ---- RESUME_FROM, TIED_EMBED_INIT_STD, WARMDOWN_ITERS --------------------------------------------------

def test_init_from_starts_from_the_weights_with_fresh_optimisers(data, tmp_path):
    first = run(data, out_dir=tmp_path / "a", iterations=4, swa=False)
    plain = tmp_path / "weights.pt"                      # the seed's final_model.pt: a plain state dict
    torch.save(first.model.state_dict(), plain)
    log = Recorder()
    second = train(small_config(), fast_train_config(iterations=2, swa=False), data, out_dir=tmp_path / "b",
                   ops="reference", init_from=plain, log=log)
    assert second.summary["initial_val_bpb"] == first.summary["final_val_bpb"]     # step 0 holds the weights
    assert f"resuming_from:{plain}" in log.lines and "resume:loaded model weights (optimizer states reset)" in log.lines
    state = read_checkpoint(tmp_path / "b" / "checkpoint.pt", expect="training").contents
    assert state["step"] == 2                                                        # a new run ...
    adam_steps = {float(s["step"]) for s in state["optimizers"][1]["state"].values()}
    assert adam_steps == {2.0}                                                       # ... with fresh optimisers
    with pytest.raises(SetupError, match="model config differs"):                   # a file with its own config
        train(small_config(model_dim=64), fast_train_config(), data, ops="reference",
              init_from=tmp_path / "a" / "final_model.pt", log=Recorder())
    with pytest.raises(SetupError, match="give one of them"):
        train(small_config(), fast_train_config(), data, ops="reference", init_from=plain,
              resume=tmp_path / "b" / "checkpoint.pt", log=Recorder())


def test_tied_embed_init_std_is_a_config_field():
    assert CrawlerConfig().tied_embed_init_std == TOK_EMB_STD
    for std in (TOK_EMB_STD, 0.02):
        torch.manual_seed(0)
        model = CrawlerGPT(small_config(tied_embed_init_std=std), ops="reference")
        assert model.tok_emb.weight.std().item() == pytest.approx(std, rel=0.03)    # 320 x 32 draws


def test_warmdown_iters_is_the_seeds_rule_without_a_wallclock_cap(data, monkeypatch):
    def seed_rule(step, iterations, warmdown):       # the seed's lr_mul when MAX_WALLCLOCK_SECONDS=0
        start = max(iterations - warmdown, 0)
        return max((iterations - step) / warmdown, 0.0) if start <= step < iterations else 1.0

    for iterations, warmdown in ((20, 5), (10, 40), (7, 7)):
        for step in range(iterations):
            got = lr_multiplier(step, 0.0, iterations=iterations, max_wallclock_ms=None, warmdown_iters=warmdown)
            assert got == pytest.approx(seed_rule(step, iterations, warmdown), abs=1e-12)
    seen = spy_steps(monkeypatch)
    run(data, iterations=6, warmdown_iters=4)
    assert [s["multiplier"] for s in seen] == pytest.approx([1, 1, 1, 0.75, 0.5, 0.25])
    with pytest.raises(SetupError, match="only without a wall-clock cap"):
        TrainConfig(warmdown_iters=100).validate()


# ---- TTT knobs ----------------------------------------------------------------------------------------

def test_ttt_knobs_on_the_command_line_freeze_and_train_as_the_seeds():
    args = train_cli.build_parser().parse_args(
        ["--ttt-lr", "0.05", "--ttt-momentum", "0.5", "--ttt-grad-clip", "2", "--ttt-freeze-blocks", "2",
         "--ttt-batch-seqs", "4", "--ttt-chunk-tokens", "32"])
    config = ttt_config_from_args(args, epochs=2)
    assert config == TTTConfig(chunk_tokens=32, epochs=2, lr=0.05, momentum=0.5, batch_seqs=4, grad_clip=2.0,
                               frozen_prefixes=("flat_blocks.0.", "flat_blocks.1.", "crawler_blocks.0.",
                                                "crawler_blocks.1."))
    assert ttt_config_from_args(train_cli.build_parser().parse_args([])) == TTTConfig()
    from crawler.evaluate import build_parser as evaluate_parser
    assert ttt_config_from_args(evaluate_parser().parse_args(["--artifact", "a", "--ttt-freeze-blocks", "0"])) \
        == TTTConfig(frozen_prefixes=())
    from conftest import filled_crawler
    model = filled_crawler(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 64, (129,), generator=torch.Generator().manual_seed(0))
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    legal_ttt_bpb(model, tokens, luts, seq_len=16, stride=8, config=config, log=None)
    blocks_0_1 = ("flat_blocks.0.", "flat_blocks.1.", "crawler_blocks.0.", "crawler_blocks.1.")
    for name, value in model.state_dict().items():
        moved = not torch.equal(value, before[name])
        assert moved != name.startswith(blocks_0_1) or name == "crawler_residual_scales.0", name


# ---- train_alpha under DDP ----------------------------------------------------------------------------

def _train_alpha_worker(rank, world, data_dir, tok, out_dir):
    data = prepare_data(data_dir, tok, 320, val_max_tokens=16 * 16 + 1)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    for name, extra in (("alpha", {}), ("progressive", {"progressive_schedule": "2:2"})):
        train(small_config(train_alpha=True), fast_train_config(iterations=4, **extra), data,
              out_dir=f"{out_dir}/{name}", ops="reference", ctx=ctx, log=lambda _: None)


def test_train_alpha_under_two_process_ddp(dataset, data, tmp_path):
    """No unused parameter (alpha[0] is never read; a loop that does not run yet trains no alpha), no
    find_unused_parameters: the run completes on 2 gloo ranks and equals one process on the same batch."""
    run_gloo(_train_alpha_worker, tmp_path, *map(str, dataset), str(tmp_path))
    for name, extra in (("alpha", {}), ("progressive", {"progressive_schedule": "2:2"})):
        ddp = model_from_checkpoint(tmp_path / name / "final_model.pt", ops="reference")
        alpha = ddp.crawler_residual_scales
        assert alpha[0].item() == 0.5 and alpha[1].item() != 0.5                   # alpha[1] trained
        single = run(data, model_config=small_config(train_alpha=True), iterations=4, grad_accum_steps=2, **extra)
        for k, v in single.model.state_dict().items():
            assert torch.allclose(ddp.state_dict()[k], v, atol=1e-4, rtol=1e-3), (name, k)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 4


@pytest.mark.gpu
def test_gpu_compiled_variants_compile_in_the_warmup_only(data, monkeypatch):
    """On CUDA with torch.compile (inductor): the progressive schedule's two loop counts and late QAT's
    off/on graphs are all compiled during the warm-up; training then never compiles again."""
    from torch._dynamo.utils import counters
    after_warmup = []
    original = trainer_mod._Trainer.compile_warmup

    def spy(self):
        original(self)
        after_warmup.append(counters["stats"]["unique_graphs"])

    monkeypatch.setattr(trainer_mod._Trainer, "compile_warmup", spy)
    torch._dynamo.reset()
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    log = Recorder()
    res = train(small_config(model_dim=64), fast_train_config(iterations=8, warmup_steps=4, compile=True,
                                                              muon_dtype="bfloat16", progressive_schedule="3:2",
                                                              late_qat_threshold=0.5, qat_small_numel=0),
                data, ops="auto", ctx=ctx, log=log)
    assert res.summary["compiled"] and "late_qat:activated at step 6 scale=0.5000 threshold=0.5" in log.lines
    assert after_warmup and counters["stats"]["unique_graphs"] == after_warmup[0]
