"""The training loop (docs/math.md §2): QAT on in training and off in evaluation, SWA, the wall-clock stop,
compile warm-up restore, checkpoints (atomic, weights-only, refusing other configs/data), resume equal to
an uninterrupted run, and a two-process gloo DDP run equal to one process with the same global batch."""
import json
import os
import pickle

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

from crawler.checkpoint import model_from_checkpoint, read_checkpoint
from crawler.errors import SetupError
from crawler.model import CastedLinear, CrawlerGPT
from crawler.optim import Muon
from crawler.runtime import DistContext
from crawler.training import prepare_data, train
from crawler.training.averaging import WeightAverager


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_data")
    data_dir, tok = make_dataset(root)
    return data_dir, tok


@pytest.fixture(scope="module")
def data(dataset):
    data_dir, tok = dataset
    return prepare_data(data_dir, tok, 320, val_max_tokens=16 * 16 + 1)


def quiet(msg):
    pass


def run(data, out_dir=None, model_config=None, resume=None, **tc):
    torch.set_num_threads(1)
    return train(model_config or small_config(), fast_train_config(**tc), data, out_dir=out_dir,
                 ops="reference", resume=resume)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_and_writes_outputs(data, tmp_path):
    res = run(data, tmp_path / "out", iterations=12, log_every=4)
    s = res.summary
    assert s["steps"] == 12 and s["final_val_bpb"] < s["initial_val_bpb"] - 0.5
    losses = [l for _, l in s["history"]["train_loss"]]
    assert losses[-1] < losses[0] - 1.0
    for name in ("train.log", "checkpoint.pt", "final_model.pt", "summary.json"):
        assert (tmp_path / "out" / name).is_file()
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["final_val_bpb"] == s["final_val_bpb"]
    log = (tmp_path / "out" / "train.log").read_text()
    assert "step:12/12 val_loss:" in log and "val_bpb:" in log and "progress:" in log
    assert "step:4/12 train_loss:" in log and " step_avg:" in log
    reloaded = model_from_checkpoint(tmp_path / "out" / "final_model.pt", ops="reference")
    assert states_equal(reloaded.state_dict(), res.model.state_dict())
    assert not res.model.training


def test_qat_on_while_training_off_for_eval(data, monkeypatch):
    seen = []
    original = CastedLinear.effective_weight

    def spy(self):
        seen.append((torch.is_grad_enabled(), self.qat))
        return original(self)

    monkeypatch.setattr(CastedLinear, "effective_weight", spy)
    res = run(data, iterations=2, val_every=1)
    train_flags = {qat for grad, qat in seen if grad}
    eval_flags = {qat for grad, qat in seen if not grad}
    assert train_flags == {True} and eval_flags == {False}
    assert not any(m.qat for m in res.model.modules() if isinstance(m, CastedLinear))


def test_weight_averager_is_the_mean_of_snapshots():
    torch.manual_seed(0)
    model = CrawlerGPT(small_config(), ops="reference")
    avg, snaps = WeightAverager(), []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.collect(model)
        snaps.append({k: v.clone() for k, v in model.state_dict().items()})
    out = avg.average(model.state_dict())
    for k in out:
        assert torch.allclose(out[k], sum(s[k] for s in snaps) / 3, atol=1e-6)


def test_swa_collects_on_schedule_and_is_loaded(data, monkeypatch):
    collected = []
    original = WeightAverager.collect

    def spy(self, model):
        collected.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        original(self, model)

    monkeypatch.setattr(WeightAverager, "collect", spy)
    # iterations 8, warmdown 0.5: steps 4..7 (0-based) run at multipliers 1, .75, .5, .25; a snapshot is
    # taken after a step that ran below 0.8 when the step count is then even -> after steps 5 and 7.
    res = run(data, iterations=8, swa_every=2, swa_start_mult=0.8)
    assert len(collected) == 2 and res.summary["averaging"] == "swa (2 snapshots)"
    for k, v in res.model.state_dict().items():
        assert torch.allclose(v, (collected[0][k] + collected[1][k]) / 2, atol=1e-6)
    assert run(data, iterations=4, swa=False).summary["averaging"] is None
    assert run(data, iterations=4, ema=True).summary["averaging"] == "ema"


def test_wallclock_cap_stops_the_loop(data):
    s = run(data, iterations=10**6, max_wallclock_seconds=1.0, log_every=0).summary
    assert 1 <= s["steps"] < 10**6
    assert s["train_time_ms"] >= 1000.0
    assert s["history"]["val"][-1]["step"] == s["steps"]     # the final validation still runs


def test_compile_warmup_restores_state(data):
    a = run(data, iterations=3, warmup_steps=0).model.state_dict()
    b = run(data, iterations=3, warmup_steps=2).model.state_dict()
    assert states_equal(a, b)


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(data, tmp_path, monkeypatch):
    full = run(data, tmp_path / "full", iterations=7, checkpoint_every=3)
    restore = kill_at_step(monkeypatch, 4, Interrupt)
    with pytest.raises(Interrupt):
        run(data, tmp_path / "cut", iterations=7, checkpoint_every=3)
    restore()
    ckpt = read_checkpoint(tmp_path / "cut" / "checkpoint.pt", expect="training").contents
    assert ckpt["step"] == 3 and ckpt["swa"]["count"] == 1
    resumed = run(data, tmp_path / "cut", iterations=7, checkpoint_every=3, resume=tmp_path / "cut" / "checkpoint.pt")
    assert resumed.summary["resumed_from_step"] == 3 and resumed.summary["steps"] == 7
    assert states_equal(full.model.state_dict(), resumed.model.state_dict())
    assert full.summary["history"]["train_loss"] == resumed.summary["history"]["train_loss"]
    assert full.summary["final_val_bpb"] == resumed.summary["final_val_bpb"]
    assert "resume: continuing" in (tmp_path / "cut" / "train.log").read_text()


def test_resume_refuses_other_model_or_data(data, dataset, tmp_path):
    run(data, tmp_path / "a", iterations=2)
    ckpt = tmp_path / "a" / "checkpoint.pt"
    with pytest.raises(SetupError, match=r"model config differs \(model_dim: checkpoint 32 vs now 64"):
        run(data, model_config=small_config(model_dim=64), resume=ckpt, iterations=3)
    other_dir, tok = make_dataset(tmp_path / "other", train_docs=200)
    other = prepare_data(other_dir, tok, 320, val_max_tokens=16 * 16 + 1)
    with pytest.raises(SetupError, match="other data or another tokenizer.*train_shards"):
        run(other, resume=ckpt, iterations=3)
    # changing the batch is allowed (a warning), the architecture is not
    run(data, model_config=small_config(train_batch_tokens=256), resume=ckpt, iterations=3)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_is_weights_only_and_checked(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "crawler-train-checkpoint", "x": Payload()}, f, protocol=2)
    with pytest.raises(SetupError, match="cannot be read as a trainer checkpoint"):
        read_checkpoint(evil, expect="training")
    torch.save({"hello": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(SetupError, match="not a trainer checkpoint"):
        read_checkpoint(tmp_path / "other.pt", expect="training")
    with pytest.raises(SetupError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt", expect="training")


def test_truncated_checkpoint_is_refused(data, tmp_path):
    run(data, tmp_path / "a", iterations=1)
    raw = (tmp_path / "a" / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SetupError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pt", expect="training")


# ---- two processes (gloo) vs one --------------------------------------------------------------------

def _muon_two_steps() -> list[torch.nn.Parameter]:
    """Three matrices after two Muon steps on fixed random gradients (sharded over the ranks under DDP)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((8, 12), (12, 8), (6, 6))]
    opt = Muon(params, lr=0.1, momentum=0.9, weight_decay=0.05, compute_dtype=torch.float32)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params


def _ddp_worker(rank, world, data_dir, tok, out_dir):
    data = prepare_data(data_dir, tok, 320, val_max_tokens=16 * 16 + 1)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    train(small_config(), fast_train_config(iterations=5), data, out_dir=out_dir, ops="reference",
          ctx=ctx, log=quiet)
    # Muon's rank-sharded step on its own: bitwise equal to the single-process step (checked by the parent)
    torch.save([p.detach() for p in _muon_two_steps()], os.path.join(out_dir, f"muon_rank{rank}.pt"))


def test_two_process_ddp_matches_one_process(dataset, data, tmp_path):
    data_dir, tok = dataset
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    run_gloo(_ddp_worker, tmp_path, str(data_dir), str(tok), str(ddp_dir))
    ddp = json.loads((ddp_dir / "summary.json").read_text())
    # one process, same global batch: 2 micro-batches of the same 64-token spans the two ranks read
    single = run(data, iterations=5, grad_accum_steps=2)
    assert ddp["world_size"] == 2 and ddp["grad_accum_steps"] == 1
    ddp_losses = [l for _, l in ddp["history"]["train_loss"]]
    one_losses = [l for _, l in single.summary["history"]["train_loss"]]
    assert len(ddp_losses) == len(one_losses) == 5
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4, abs=1e-4)
    assert ddp["final_val_bpb"] == pytest.approx(single.summary["final_val_bpb"], rel=1e-4)
    ddp_model = model_from_checkpoint(ddp_dir / "final_model.pt", ops="reference").state_dict()
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp_model[k], v, atol=1e-4, rtol=1e-3), k

    params = _muon_two_steps()
    for rank in range(2):
        got = torch.load(ddp_dir / f"muon_rank{rank}.pt", weights_only=True)
        assert all(torch.equal(a, b.detach()) for a, b in zip(got, params))


@pytest.mark.gpu
def test_gpu_compiled_bf16_training_learns(data, tmp_path):
    """On CUDA: Triton ops, bf16 autocast, torch.compile with compile warm-up and state restore, bf16
    Newton-Schulz, fused AdamW; the loss falls and a checkpoint resumes."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    tc = dict(iterations=30, warmup_steps=3, compile=True, muon_dtype="bfloat16", checkpoint_every=10, log_every=5)
    res = train(small_config(model_dim=64), fast_train_config(**tc), data, out_dir=tmp_path / "gpu", ops="auto",
                ctx=ctx)
    s = res.summary
    assert s["compiled"] and s["steps"] == 30 and s["final_val_bpb"] < s["initial_val_bpb"] - 0.5
    resumed = train(small_config(model_dim=64), fast_train_config(**{**tc, "iterations": 35}), data,
                    out_dir=tmp_path / "gpu", ops="auto", ctx=ctx, resume=tmp_path / "gpu" / "checkpoint.pt")
    assert resumed.summary["resumed_from_step"] == 30 and resumed.summary["steps"] == 35
