"""Sliding-window evaluation and legal score-first TTT (docs/math.md §6), and the `python -m crawler.evaluate` CLI."""
import copy
import math

import pytest
import torch
from trainer_fixtures import run_gloo

from crawler.artifact import Artifact, QuantizedTensor, model_from_artifact, save_artifact
from crawler.bpb import Window, plan_windows, score_windows
from crawler.config import CrawlerConfig
from crawler.corpus import builtin_documents
from crawler.data import read_shard, write_shard
from crawler.evaluate import main, sliding_window_bpb, val_bpb
from crawler.model import CastedLinear, CrawlerGPT
from crawler.tokenizer import BOS_ID, byte_luts, load_tokenizer, train_tokenizer
from crawler.ttt import TTTConfig, legal_ttt_bpb
from kernels.reference import quantize_rtn, sdclip_scales

V = 64          # the synthetic stream uses ids 0..15 of a 64-id vocabulary
CONFIG = CrawlerConfig(vocab_size=V, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2, bigram_buckets=512,
                       bigram_dim=8, ve_dim=8, train_seq_len=32, train_batch_tokens=512)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: one thread is ~10x faster than oversubscribing a busy 2-core machine.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def stream(n: int, seed: int) -> torch.Tensor:
    """x[t+1] = x[t-1] + 1 (mod 16), with a 10% random jump: predicting a target needs the token BEFORE
    the input token, so a window's first position (no context) is much worse than the rest."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 16, (n,), generator=g)
    jump = torch.rand(n, generator=g) < 0.1
    out = [1, 2]
    for k in range(n - 2):
        out.append(int(noise[k]) if jump[k] else (out[-2] + 1) % 16)
    return torch.tensor(out)


def luts(vocab: int = V):
    """Bytes 1..3 by id, leading spaces on even ids, id 0 a boundary: exercises the whole byte rule."""
    ids = torch.arange(vocab)
    return ((ids % 3 + 1).to(torch.int16), ids % 2 == 0, ids == 0)


@pytest.fixture(scope="module")
def trained():
    """A tiny CrawlerGPT after 40 Adam steps on the synthetic stream (~4 s), and held-out tokens."""
    torch.manual_seed(0)
    model = CrawlerGPT(CONFIG, ops="reference")
    train = stream(20_000, seed=1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    g = torch.Generator().manual_seed(2)
    for _ in range(40):
        starts = torch.randint(0, train.numel() - 33, (16,), generator=g)
        x = torch.stack([train[s:s + 32] for s in starts])
        y = torch.stack([train[s + 1:s + 33] for s in starts])
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), stream(401, seed=3)


# ------------------------------------------------------------------------------------------------
# Window planning

def expected_context(j: int, T: int, stride: int) -> int:
    """Tokens a model sees when target j is scored: all of [0, j] in the first window, else those since
    the start of the unique window k·stride whose scored range [k·stride + T − stride, k·stride + T)
    holds j."""
    if j < T:
        return j + 1
    return j - stride * ((j - T) // stride + 1) + 1


@pytest.mark.parametrize("n", [1, 5, 12, 13, 15, 16, 17, 20, 23, 50, 63])
@pytest.mark.parametrize("T,stride", [(16, 4), (16, 16), (16, 1), (16, 5)])
def test_plan_scores_every_target_once(n, T, stride):
    rows = [Window(*r) for r in plan_windows(n, T, stride).tolist()]
    covered = []
    for i, w in enumerate(rows):
        assert w.start % stride == 0 and 0 < w.length <= T and w.start + w.length <= n
        assert w.score_from == (0 if i == 0 else T - stride) and w.score_from < w.length
        covered += range(w.start + w.score_from, w.start + w.length)
        for j in range(w.start + w.score_from, w.start + w.length):
            assert j - w.start + 1 == expected_context(j, T, stride)
    assert covered == list(range(n))          # in order, no gaps, no repeats
    # The fixed filter: no further window would score anything.
    assert rows[-1].start + stride + (T - stride) >= n


def test_plan_edge_cases_and_errors():
    assert plan_windows(5, 16, 4).tolist() == [[0, 5, 0]]                # N < T: one short window
    assert plan_windows(16, 16, 4).tolist() == [[0, 16, 0]]              # N = T
    assert plan_windows(17, 16, 4).tolist() == [[0, 16, 0], [4, 13, 12]]   # N = T + 1: scores target 16
    with pytest.raises(ValueError, match="stride"):
        plan_windows(10, 16, 17)
    with pytest.raises(ValueError, match="n_targets"):
        plan_windows(0, 16, 4)
    with pytest.raises(ValueError, match="seq_len"):
        plan_windows(10, 0, 4)


# ------------------------------------------------------------------------------------------------
# The scorer, instrumented

class MarkerSpy(torch.nn.Module):
    """On the stream tokens = arange(N + 1), the input at a target j is the token j. token_nll returns
    1000 + (position + 1) where x == j and 0 elsewhere, so the summed nats of a scoring pass say how often
    target j was counted (thousands) and with how much context (the rest), padded positions included."""

    def __init__(self, j: int):
        super().__init__()
        self.j = j
        self.p = torch.nn.Parameter(torch.zeros(1))

    def token_nll(self, x, y):
        assert x.dtype == torch.int64 and (y == x + 1).all()
        ctx = torch.arange(1, x.shape[1] + 1, dtype=torch.float32).expand(x.shape)
        return torch.where(x == self.j, 1000.0 + ctx, torch.zeros(()))


@pytest.mark.parametrize("n", [5, 16, 17, 29, 40])
@pytest.mark.parametrize("batch_seqs", [1, 3])
def test_scorer_counts_each_target_once_with_its_context(n, batch_seqs):
    T, stride = 16, 4
    tokens = torch.arange(n + 1, dtype=torch.int64).to(torch.uint16)   # uint16 like real shards
    windows = plan_windows(n, T, stride)
    ones = (torch.ones(n + 1, dtype=torch.int16), torch.zeros(n + 1, dtype=torch.bool),
            torch.zeros(n + 1, dtype=torch.bool))
    for j in range(n):
        sums = torch.zeros(3, dtype=torch.float64)
        score_windows(MarkerSpy(j), tokens, ones, windows, seq_len=T, batch_seqs=batch_seqs, sums=sums)
        assert sums[1] == n and sums[2] == n
        assert 1000 < sums[0] < 2000, f"target {j} counted {int(sums[0]) // 1000} times"
        assert sums[0] - 1000 == expected_context(j, T, stride)


def test_sliding_window_bpb_by_hand():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def token_nll(self, x, y):
            return torch.full(y.shape, math.log(2.0))

    tokens = stream(30, seed=0)
    base, space, boundary = luts()
    x, y = tokens[:-1], tokens[1:]
    nbytes = (base[y].double() + (space[y] & ~boundary[x]).double()).sum().item()
    loss, bpb = sliding_window_bpb(Constant(), tokens, luts(), seq_len=8, stride=3, batch_seqs=2)
    assert loss == pytest.approx(math.log(2)) and bpb == pytest.approx(29 / nbytes)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_bpb(Constant(), tokens[:1], luts(), seq_len=8)
    with pytest.raises(TypeError, match="integer dtype"):
        sliding_window_bpb(Constant(), tokens.float(), luts(), seq_len=8)


def test_sliding_beats_plain_on_trained_model(trained):
    model, val = trained
    plain = val_bpb(model, val, luts(), seq_len=16)
    sliding = sliding_window_bpb(model, val, luts(), seq_len=16, stride=4, batch_seqs=8)
    # Plain windows start 1 in 16 targets without context; the stream needs one token of it.
    assert sliding[1] < plain[1] - 0.03, (plain, sliding)
    assert not model.training


# ------------------------------------------------------------------------------------------------
# Legal TTT

class VersionSpy(torch.nn.Module):
    """Records, per scored window row and per trained sequence, the first input token (= its first target
    index on an arange stream) and the update counter of its trainable weight (`_version` grows with every
    in-place optimiser step)."""

    def __init__(self):
        super().__init__()
        self.flat_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1)])   # frozen by name
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.scored, self.trained = [], []

    def token_nll(self, x, y):
        self.scored += [(int(r[0]), self.w._version) for r in x]
        return torch.ones(x.shape)

    def forward(self, x, y):
        self.trained += [(int(r[0]), x.shape[1], self.w._version) for r in x]
        return (self.w - y.float().mean() / 100) ** 2


@pytest.mark.parametrize("n,T,stride,chunk", [(70, 8, 4, 16), (61, 8, 3, 10), (40, 8, 8, 8)])
def test_ttt_scores_every_target_before_any_update_that_used_it(n, T, stride, chunk):
    spy = VersionSpy()
    frozen_before = spy.flat_blocks[0].weight.detach().clone()
    cfg = TTTConfig(chunk_tokens=chunk, epochs=2, lr=0.1, batch_seqs=2)
    legal_ttt_bpb(spy, torch.arange(n + 1), luts(n + 1), seq_len=T, stride=stride, batch_seqs=3, config=cfg,
                  log=None)
    windows = {w[0]: Window(*w) for w in plan_windows(n, T, stride).tolist()}
    score_version, scored_by = {}, {}
    for start, version in spy.scored:
        w = windows[start]
        for j in range(start + w.score_from, start + w.length):
            assert j not in score_version, f"target {j} scored twice"
            score_version[j], scored_by[j] = version, w
    assert sorted(score_version) == list(range(n))
    n_chunks = -(-n // chunk)
    trained_targets = set()
    for start, length, version in spy.trained:
        for j in range(start, start + length):
            assert score_version[j] <= version, f"target {j} scored after an update that trained on it"
            trained_targets.add(j)
    # Chunk c trains on its floor(chunk / T) whole sequences; the last chunk is never trained on.
    assert trained_targets == {j for j in range(n) if j // chunk < n_chunks - 1 and j % chunk < chunk // T * T}
    # ... and every score uses the model adapted on all chunks before its window's chunk.
    steps_per_chunk = cfg.epochs * -(-(chunk // T) // cfg.batch_seqs)
    for j, w in scored_by.items():
        c = min((w.start + w.score_from) // chunk, n_chunks - 1)
        assert score_version[j] == c * steps_per_chunk
    assert torch.equal(spy.flat_blocks[0].weight, frozen_before)


def tiny_ttt(model, tokens, **kw):
    cfg = TTTConfig(chunk_tokens=96, epochs=3, lr=kw.pop("lr", 0.002), batch_seqs=2)
    return legal_ttt_bpb(model, tokens, luts(), seq_len=32, stride=8, config=cfg, log=None, **kw)


def test_ttt_with_lr_zero_equals_sliding_window_exactly(trained):
    model, val = trained
    model = copy.deepcopy(model)
    for batch_seqs in (1, 5):
        sliding = sliding_window_bpb(model, val, luts(), seq_len=32, stride=8, batch_seqs=batch_seqs)
        ttt = tiny_ttt(model, val, lr=0.0, batch_seqs=batch_seqs)
        if batch_seqs == 1:
            assert ttt == sliding                       # same forwards in the same order: bit-identical
        else:
            assert ttt == pytest.approx(sliding, rel=1e-6)   # batches regroup at chunk boundaries


def test_ttt_freezes_blocks_zero_and_trains_alpha(trained):
    model, val = trained
    model = copy.deepcopy(model)
    model.set_qat(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    qat_seen = []
    handle = model.flat_blocks[1].attn.c_q.register_forward_pre_hook(lambda m, args: qat_seen.append(m.qat))
    logs = []
    cfg = TTTConfig(chunk_tokens=96, epochs=2, lr=0.05, batch_seqs=4)
    try:
        legal_ttt_bpb(model, val, luts(), seq_len=32, stride=8, batch_seqs=8, config=cfg, log=logs.append)
    finally:
        handle.remove()
    for name, p in model.named_parameters():
        if name.startswith(("flat_blocks.0.", "crawler_blocks.0.")):
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "crawler_residual_scales.1" in changed                      # alpha is trainable in TTT
    assert {"tok_emb.weight", "crawler_blocks.1.attn.c_q.weight", "flat_blocks.2.mlp.fc.weight"} <= changed
    assert not model.crawler_residual_scales[1].requires_grad          # flags restored afterwards
    assert qat_seen and not any(qat_seen)                              # QAT off during TTT ...
    assert all(m.qat for m in model.modules() if isinstance(m, CastedLinear))   # ... and restored
    assert len([line for line in logs if line.startswith("ttt chunk")]) == 5
    assert "eta:" in logs[-1] and "val_bpb_so_far:" in logs[-1]


def test_ttt_config_validation(trained):
    model, val = trained
    with pytest.raises(ValueError, match="momentum"):
        TTTConfig(momentum=1.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        legal_ttt_bpb(model, val, luts(), seq_len=32, config=TTTConfig(chunk_tokens=16), log=None)
    with pytest.raises(ValueError, match="unwrapped model"):
        legal_ttt_bpb(torch.nn.Sequential(model), val, luts(), seq_len=32, stride=8, log=None)


@pytest.mark.gpu
def test_sliding_and_ttt_on_cuda_match_cpu(trained):
    """The CUDA path (bf16 autocast, tokens/LUTs moved per batch) agrees with the fp32 CPU numbers.
    Reference ops: the model's Triton ops are exercised by their own tests."""
    model, val = trained
    cpu_sliding = sliding_window_bpb(model, val, luts(), seq_len=32, stride=8, batch_seqs=8)
    cpu_ttt = tiny_ttt(copy.deepcopy(model), val, lr=0.05, batch_seqs=8)
    gpu = copy.deepcopy(model).cuda()
    gpu_sliding = sliding_window_bpb(gpu, val, luts(), seq_len=32, stride=8, batch_seqs=8)
    assert gpu_sliding == pytest.approx(cpu_sliding, rel=2e-2)
    assert tiny_ttt(gpu, val, lr=0.0, batch_seqs=8) == pytest.approx(gpu_sliding, rel=1e-6)
    gpu = copy.deepcopy(model).cuda()
    assert tiny_ttt(gpu, val, lr=0.05, batch_seqs=8) == pytest.approx(cpu_ttt, rel=3e-2)


# ------------------------------------------------------------------------------------------------
# Distributed (2 processes, gloo) equals single process

def _distributed_worker(rank, world, state_path, out_path):
    model = CrawlerGPT(CONFIG, ops="reference")
    model.load_state_dict(torch.load(state_path, weights_only=True))
    val = stream(401, seed=3)
    sliding = sliding_window_bpb(model, val, luts(), seq_len=32, stride=8, batch_seqs=3)
    ttt = tiny_ttt(model, val, lr=0.05, batch_seqs=3)
    if rank == 0:
        torch.save({"sliding": torch.tensor(sliding), "ttt": torch.tensor(ttt),
                    "state": model.state_dict()}, out_path)


def test_distributed_ttt_equals_single_process(trained, tmp_path):
    model, val = trained
    state_path, out_path = tmp_path / "state.pt", tmp_path / "out.pt"
    torch.save(model.state_dict(), state_path)
    run_gloo(_distributed_worker, tmp_path, str(state_path), str(out_path))
    got = torch.load(out_path, weights_only=True)
    single = copy.deepcopy(model)
    sliding = sliding_window_bpb(single, val, luts(), seq_len=32, stride=8, batch_seqs=3)
    ttt = tiny_ttt(single, val, lr=0.05, batch_seqs=3)
    assert got["sliding"].tolist() == pytest.approx(sliding, rel=1e-6)   # batches differ: fp32 per-row noise
    assert got["ttt"].tolist() == pytest.approx(ttt, rel=1e-5)
    assert ttt[1] != pytest.approx(sliding[1], rel=1e-4)      # TTT really changed the model
    for name, p in single.state_dict().items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------
# CLI

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A 400-piece tokenizer, a val shard of BOS-separated documents, and an int6 artifact of an
    untrained tiny model (block matrices RTN int6, the rest fp32 passthrough)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    docs = list(builtin_documents(max_documents=30))
    sp = train_tokenizer(docs, root / "data" / "tokenizer.model", 400)
    ids = [t for d in docs[:6] for t in [BOS_ID] + sp.encode(d)]
    write_shard(root / "data" / "fineweb_val_000000.bin", ids[:700])
    config = CrawlerConfig(vocab_size=400, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2,
                           bigram_buckets=64, bigram_dim=8, ve_dim=8, train_seq_len=32)
    torch.manual_seed(0)
    model = CrawlerGPT(config, ops="reference")
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight") and t.dim() == 2 and "blocks" in name:
            scales = sdclip_scales(t.float())
            tensors[name] = QuantizedTensor(quantize_rtn(t.float(), scales), scales, 6, "rtn")
        else:
            tensors[name] = t.float()
    save_artifact(Artifact(config=config.to_dict(), tensors=tensors), root / "model.int6")
    return root


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_modes(cli_files, capsys):
    base = ("--artifact", cli_files / "model.int6", "--data-dir", cli_files / "data", "--seq-len", 32,
            "--batch-seqs", 8)
    results = {}
    for mode in ("plain", "sliding", "ttt"):
        extra = ("--stride", 8, "--ttt-chunk-tokens", 256, "--ttt-epochs", 1) if mode != "plain" else ()
        code, out, err = run_cli(capsys, *base, "--mode", mode, *extra)
        assert code == 0, err
        last = out.strip().splitlines()[-1]
        weights = "dequantized" if mode == "ttt" else "int6"     # scoring computes on the packed weights
        assert last.startswith(f"mode:{mode} weights:{weights} val_loss:") and "val_tokens:700" in last
        results[mode] = float(last.split("val_bpb:")[1].split()[0])
    assert "ttt chunk 3/3" in out
    model = model_from_artifact(cli_files / "model.int6")
    tokens = read_shard(cli_files / "data" / "fineweb_val_000000.bin")
    sp_luts = byte_luts(load_tokenizer(cli_files / "data" / "tokenizer.model"), 400)
    direct = sliding_window_bpb(model, tokens, sp_luts, seq_len=32, stride=8)
    # the int6 path agrees with the dequantised model to float round-off (and the printed 4 decimals)
    assert results["sliding"] == pytest.approx(direct[1], rel=1e-4, abs=6e-5)
    code, out, _ = run_cli(capsys, *base, "--mode", "plain", "--dequantized")
    last = out.strip().splitlines()[-1]
    assert code == 0 and last.startswith("mode:plain weights:dequantized val_loss:")
    assert float(last.split("val_bpb:")[1].split()[0]) == pytest.approx(results["plain"], rel=1e-4, abs=6e-5)
    assert all(math.isfinite(v) and v > 0 for v in results.values()), results


def test_cli_errors(cli_files, tmp_path, capsys):
    data = ("--data-dir", cli_files / "data")
    code, _, err = run_cli(capsys, "--artifact", tmp_path / "nope.int6", *data)
    assert code == 2 and "nope.int6" in err and "does not exist" in err
    junk = tmp_path / "junk.int6"
    junk.write_bytes(b"PK\x03\x04 definitely not an artifact")
    code, _, err = run_cli(capsys, "--artifact", junk, *data)
    assert code == 2 and "not a crawler artifact" in err
    cut = tmp_path / "cut.int6"
    cut.write_bytes((cli_files / "model.int6").read_bytes()[:100])
    code, _, err = run_cli(capsys, "--artifact", cut, *data)
    assert code == 2 and "truncated" in err
    art = ("--artifact", cli_files / "model.int6", "--stride", 8)    # windows fit its train_seq_len of 32
    code, _, err = run_cli(capsys, *art, "--data-dir", tmp_path / "missing")
    assert code == 2 and "does not exist" in err and "missing" in err
    (tmp_path / "notok").mkdir()
    code, _, err = run_cli(capsys, *art, "--data-dir", tmp_path / "notok")
    assert code == 2 and "pass --tokenizer" in err
    code, _, err = run_cli(capsys, *art, *data, "--max-val-tokens", 1)
    assert code == 2 and "max_val_tokens" in err
    code, _, err = run_cli(capsys, *art, *data, "--seq-len", 32, "--stride", 64)
    assert code == 2 and "stride" in err
    with pytest.raises(SystemExit):
        main(["--artifact", "x", "--mode", "bogus"])
