"""Validation bits per byte (SPEC §6): non-overlapping windows, the stride-64 sliding window, and legal
score-first test-time training (TTT), all with float64 sums all-reduced across ranks.

`python -m crawler.evaluate --artifact A --mode {plain,sliding,ttt}` scores an int6 artifact on its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from .artifact import model_from_artifact
from .inference import load_int6_model
from .data import build_builtin_corpus, load_validation_tokens
from .model import OPS_CHOICES, CastedLinear
from .tokenizer import byte_luts, check_vocab, load_tokenizer


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def target_bytes(x: torch.Tensor, y: torch.Tensor, luts) -> torch.Tensor:
    """UTF-8 bytes each target stands for: base_bytes[y] + (has_leading_space[y] and not is_boundary[x]).

    x, y (..., T) int token ids (x_t is the token before y_t); luts = (base_bytes, has_leading_space,
    is_boundary) from crawler.tokenizer.byte_luts. Returns (..., T) float64.
    """
    base_bytes, has_leading_space, is_boundary = (t.to(x.device) for t in luts)
    x, y = x.long(), y.long()
    space = has_leading_space[y] & ~is_boundary[x]
    return base_bytes[y].double() + space.double()


def bpb_from_sums(nll_sum: float, token_count: float, byte_count: float) -> tuple[float, float]:
    """(mean loss in nats, bits per byte) from summed nats, tokens and bytes."""
    return nll_sum / token_count, nll_sum / (math.log(2) * byte_count)


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector of partial sums across ranks (no-op when not distributed)."""
    if _dist_info()[1] > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def unigram_bpb(train_counts: torch.Tensor, tokens: torch.Tensor, luts, *, seq_len: int) -> tuple[float, float]:
    """A context-free baseline: (val_loss, val_bpb) of the add-one-smoothed unigram distribution
    `p(t) = (count_t + 1) / (Σ count + V)` of `train_counts` (V,), scored on exactly the targets
    `val_bpb` scores (tokens truncated to whole windows of seq_len), with the same byte LUTs.
    A trained model must beat it."""
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"tokens: need at least seq_len + 1 = {seq_len + 1} validation tokens, got "
                         f"{tokens.numel()}")
    usable = tokens[: n_windows * seq_len + 1].long()
    x, y = usable[:-1], usable[1:]
    if int(y.max()) >= train_counts.numel():
        raise ValueError(f"train_counts: has {train_counts.numel()} entries but the tokens reach id {int(y.max())}")
    counts = train_counts.double()
    log_p = torch.log((counts + 1.0) / (counts.sum() + counts.numel()))
    return bpb_from_sums(float(-log_p[y].sum()), float(y.numel()), float(target_bytes(x, y, luts).sum()))
def _autocast(device: torch.device):
    # bf16 autocast on GPU as in training (SPEC §1.12); exact fp32 on CPU.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class _EvalMode:
    """Context manager: model.eval() inside, the previous train/eval mode restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def val_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, batch_seqs: int = 8) -> tuple[float, float]:
    """Non-overlapping validation: (val_loss in nats/token, val_bpb).

    tokens (N,) int token stream (BOS-separated documents); it is truncated to a multiple of seq_len
    (+1 for the shifted targets) and cut into windows of seq_len. Windows are split across ranks when
    torch.distributed is initialised; the float64 sums are all-reduced. `model.token_nll(x, y)` gives
    per-token nats. Runs in eval mode and restores the previous mode.
    """
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"tokens: need at least seq_len + 1 = {seq_len + 1} validation tokens, got "
                         f"{tokens.numel()}")
    rank, world = _dist_info()
    device = next(model.parameters()).device
    usable = tokens[: n_windows * seq_len + 1].long()
    x_all = usable[:-1].view(n_windows, seq_len)
    y_all = usable[1:].view(n_windows, seq_len)
    lo, hi = n_windows * rank // world, n_windows * (rank + 1) // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # nats, tokens, bytes
    with _EvalMode(model):
        for start in range(lo, hi, batch_seqs):
            x = x_all[start: min(start + batch_seqs, hi)].to(device)
            y = y_all[start: min(start + batch_seqs, hi)].to(device)
            with _autocast(device):
                nll = model.token_nll(x, y)
            sums[0] += nll.double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts).sum()
    nats, count, nbytes = all_reduce_sums(sums).tolist()
    return bpb_from_sums(nats, count, nbytes)


# --------------------------------------------------------------------------------------------------
# Sliding window (SPEC §6)

class Window(NamedTuple):
    """One evaluation window: inputs tokens[start : start + length], targets tokens[start + 1 :
    start + length + 1]; window positions [score_from, length) are scored."""
    start: int
    length: int
    score_from: int


def plan_windows(n_targets: int, seq_len: int, stride: int = 64) -> torch.Tensor:
    """The sliding windows over `n_targets` targets (SPEC §6, the fixed filter), as an (W, 3) int64
    tensor of rows (start, length, score_from) in increasing start order (`Window(*row)` names them).

    Starts are 0, stride, 2·stride, ... while start + (seq_len − stride) < n_targets; length =
    min(start + seq_len, n_targets) − start. The first window scores [0, length), every other one the
    fixed offset [seq_len − stride, length), so each target is scored exactly once, with at least
    seq_len − stride + 1 tokens of context once it is past the first window. The first window is kept
    even when n_targets <= seq_len − stride (the literal filter would then score nothing).
    A tensor, not a list of tuples: FineWeb's 62M-token val split has ~10⁶ windows.
    """
    for name, value, low in (("n_targets", n_targets, 1), ("seq_len", seq_len, 1), ("stride", stride, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if stride > seq_len:
        raise ValueError(f"stride ({stride}) must be <= seq_len ({seq_len})")
    offset = seq_len - stride
    starts = torch.arange(stride, max(n_targets - offset, stride), stride, dtype=torch.int64)
    starts = torch.cat((torch.zeros(1, dtype=torch.int64), starts))
    lengths = torch.clamp(n_targets - starts, max=seq_len)
    score_from = torch.full_like(starts, offset)
    score_from[0] = 0
    return torch.stack((starts, lengths, score_from), dim=1)


def _score_windows(model, tokens: torch.Tensor, luts, windows: torch.Tensor, *, seq_len: int,
                   batch_seqs: int, sums: torch.Tensor) -> None:
    """Add (nats, targets, bytes) over the scored positions of `windows` ((W, 3) rows from plan_windows,
    sorted by start) to `sums` (float64 (3,), on the model's device). Windows run `batch_seqs` at a time,
    padded to seq_len; padding repeats the last real position and is never counted (causal model)."""
    device = sums.device
    pos = torch.arange(seq_len)
    for b0 in range(0, windows.shape[0], batch_seqs):
        starts, lengths, score_from = windows[b0:b0 + batch_seqs].unbind(1)
        lo = int(starts[0])
        # Only the span of tokens this batch touches goes to the device, as int64.
        span = tokens[lo:int((starts + lengths).max()) + 1].to(device=device, dtype=torch.int64)
        rel = torch.minimum((starts - lo)[:, None] + pos, (starts + lengths - 1 - lo)[:, None]).to(device)
        scored = ((pos >= score_from[:, None]) & (pos < lengths[:, None])).to(device)
        x, y = span[rel], span[rel + 1]
        with _autocast(device):
            nll = model.token_nll(x, y)
        sums[0] += nll.double()[scored].sum()
        sums[1] += scored.sum()
        sums[2] += target_bytes(x, y, luts)[scored].sum()


def _check_stream(tokens: torch.Tensor, seq_len: int) -> int:
    """Validate a 1-D token stream and return its number of targets N = len(tokens) − 1."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens: expected a 1-D tensor of token ids, got "
                         f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    if tokens.numel() < 2:
        raise ValueError(f"tokens: need at least 2 tokens (one target), got {tokens.numel()}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    return tokens.numel() - 1


def _luts_on(luts, device: torch.device):
    return tuple(t.to(device) for t in luts)


@torch.no_grad()
def sliding_window_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, stride: int = 64,
                       batch_seqs: int = 32) -> tuple[float, float]:
    """Sliding-window validation (SPEC §6): (val_loss in nats/token, val_bpb).

    tokens (N + 1,) int token stream (uint16 is fine: each batch's span is cast to int64); windows from
    `plan_windows(N, seq_len, stride)`, every target scored exactly once. Windows run `batch_seqs` per
    forward and are split across ranks (contiguous ranges) when torch.distributed is initialised; the
    float64 sums (nats, targets, bytes) are all-reduced. `model.token_nll(x, y)` gives per-token nats
    (B, T). Runs in eval mode and restores the previous mode.
    """
    n_targets = _check_stream(tokens, seq_len)
    windows = plan_windows(n_targets, seq_len, stride)
    rank, world = _dist_info()
    n = windows.shape[0]
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with _EvalMode(model):
        _score_windows(model, tokens, _luts_on(luts, device), windows[n * rank // world: n * (rank + 1) // world],
                       seq_len=seq_len, batch_seqs=batch_seqs, sums=sums)
    return bpb_from_sums(*all_reduce_sums(sums).tolist())


# --------------------------------------------------------------------------------------------------
# Legal score-first TTT (SPEC §6)

@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Hyper-parameters of legal score-first TTT; the defaults are PR #1579's.

    chunk_tokens: targets per chunk; epochs: passes over each chunk's training sequences; lr: peak SGD
    learning rate, cosine-decayed over chunks as lr·½(1 + cos(π c/(C−1))); momentum: SGD momentum;
    batch_seqs: sequences of seq_len per optimiser step (global, split across ranks); grad_clip: global
    gradient-norm clip; frozen_prefixes: parameters whose names start with one of these stay fixed.
    A cheaper budget (CPU runs) is a caller's choice, e.g. fewer epochs or smaller chunks.
    """
    chunk_tokens: int = 32_768
    epochs: int = 3
    lr: float = 0.002
    momentum: float = 0.9
    batch_seqs: int = 32
    grad_clip: float = 1.0
    frozen_prefixes: tuple[str, ...] = ("flat_blocks.0.", "crawler_blocks.0.")

    def __post_init__(self):
        for name, low in (("chunk_tokens", 1), ("epochs", 0), ("batch_seqs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"TTTConfig: {name} must be an int >= {low}, got {value!r}")
        if not self.lr >= 0:
            raise ValueError(f"TTTConfig: lr must be >= 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TTTConfig: momentum must be in [0, 1), got {self.momentum!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"TTTConfig: grad_clip must be > 0, got {self.grad_clip!r}")
        if isinstance(self.frozen_prefixes, str):
            raise TypeError("TTTConfig: frozen_prefixes must be a tuple of str, not a str")


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks in one fp32 buffer (a rank without data in a batch
    contributes zeros). Every rank ends with identical gradients on every parameter."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def _train_chunk(model, tokens: torch.Tensor, start: int, end: int, *, seq_len: int, config: TTTConfig,
                 optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """TTT on the chunk's targets [start, end): cut into floor((end − start)/seq_len) non-overlapping
    sequences (inputs tokens[start + i·T : start + (i+1)·T], targets shifted by one; the remainder of
    fewer than seq_len targets is not trained on, as in the seed), `config.epochs` passes in batches of
    `config.batch_seqs` sequences. A batch is split across ranks; each rank weights its mean loss by its
    share of the batch and the gradients are summed, so the step equals the single-process one."""
    n_seqs = (end - start) // seq_len
    if n_seqs == 0:
        return
    rank, world = _dist_info()
    device = params[0].device
    chunk = tokens[start:start + n_seqs * seq_len + 1].to(device=device, dtype=torch.int64)
    x_all, y_all = chunk[:-1].view(n_seqs, seq_len), chunk[1:].view(n_seqs, seq_len)
    for _ in range(config.epochs):
        for b0 in range(0, n_seqs, config.batch_seqs):
            b1 = min(b0 + config.batch_seqs, n_seqs)
            lo, hi = b0 + (b1 - b0) * rank // world, b0 + (b1 - b0) * (rank + 1) // world
            optimizer.zero_grad(set_to_none=True)
            if hi > lo:
                with _autocast(device):
                    loss = model(x_all[lo:hi], y_all[lo:hi])
                (loss * ((hi - lo) / (b1 - b0))).backward()
            if world > 1:
                _all_reduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()


def legal_ttt_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, stride: int = 64, batch_seqs: int = 32,
                  config: TTTConfig | None = None,
                  log: Callable[[str], None] | None = print) -> tuple[float, float]:
    """Legal score-first TTT (SPEC §6) on `model` (the dequantised int6 artifact): (val_loss, val_bpb).

    The N = len(tokens) − 1 targets are cut into C = ceil(N / chunk_tokens) chunks; each sliding window
    (`plan_windows(N, seq_len, stride)`) belongs to the chunk of its first scored target. For c = 0..C−1:
    score chunk c's windows under no_grad (split across ranks, `batch_seqs` per forward), then, unless c
    is the last chunk, train on chunk c's targets (`_train_chunk`) with SGD at lr·½(1 + cos(π c/(C−1))).
    A window only scores targets at or after its first one, and chunk c trains only on targets in chunk
    c after all of chunk c's windows were scored, so no score depends on an update that saw its target.

    Trainable: every parameter whose name does not start with a `config.frozen_prefixes` entry, alpha
    (`crawler_residual_scales`) included; QAT is off. The model is adapted IN PLACE (its weights are the
    TTT-adapted ones afterwards); requires_grad flags, QAT flags and train/eval mode are restored. Pass
    the plain model, not a DDP/compile wrapper (the frozen names would not match: a ValueError).
    Progress per chunk goes to `log` on rank 0 (None: silent).
    """
    config = config if config is not None else TTTConfig()
    n_targets = _check_stream(tokens, seq_len)
    if config.chunk_tokens < seq_len:
        raise ValueError(f"TTTConfig.chunk_tokens ({config.chunk_tokens}) must be >= seq_len ({seq_len}) so "
                         f"each chunk holds at least one training sequence")
    windows = plan_windows(n_targets, seq_len, stride)
    K = config.chunk_tokens
    n_chunks = -(-n_targets // K)
    chunk_of = ((windows[:, 0] + windows[:, 2]) // K).clamp_(max=n_chunks - 1)
    bounds = [0] + torch.bincount(chunk_of, minlength=n_chunks).cumsum(0).tolist()
    rank, world = _dist_info()
    device = next(model.parameters()).device
    luts = _luts_on(luts, device)

    named = list(model.named_parameters())
    frozen = {name for name, _ in named if name.startswith(tuple(config.frozen_prefixes))}
    if config.frozen_prefixes and not frozen:
        raise ValueError(f"TTT: no parameter name starts with any of {config.frozen_prefixes} "
                         f"(pass the unwrapped model, not a DDP/torch.compile wrapper)")
    params = [p for name, p in named if name not in frozen]
    saved_flags = [(p, p.requires_grad) for _, p in named]
    casted = [m for m in model.modules() if isinstance(m, CastedLinear)]
    saved_qat = [(m, m.qat) for m in casted]
    was_training = model.training
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for name, p in named if name in frozen)
    if log is not None and rank == 0:
        log(f"ttt: {n_chunks} chunks of {K} targets, {windows.shape[0]} windows (T={seq_len}, stride {stride}), "
            f"epochs {config.epochs}, lr {config.lr}, trainable {n_train:,} / frozen {n_frozen:,} params")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    try:
        for name, p in named:
            p.requires_grad_(name not in frozen)
        for m in casted:
            m.qat = False
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum) if params else None
        for c in range(n_chunks):
            mine = windows[bounds[c]:bounds[c + 1]]
            mine = mine[mine.shape[0] * rank // world: mine.shape[0] * (rank + 1) // world]
            model.eval()
            with torch.no_grad():
                _score_windows(model, tokens, luts, mine, seq_len=seq_len, batch_seqs=batch_seqs, sums=sums)
            lr_c = config.lr * 0.5 * (1.0 + math.cos(math.pi * c / (n_chunks - 1))) if n_chunks > 1 else 0.0
            if c < n_chunks - 1 and config.epochs > 0 and optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_c
                model.train()
                _train_chunk(model, tokens, c * K, min((c + 1) * K, n_targets), seq_len=seq_len, config=config,
                             optimizer=optimizer, params=params)
            totals = all_reduce_sums(sums.clone()).tolist()
            if log is not None and rank == 0:
                elapsed = time.perf_counter() - t0
                log(f"ttt chunk {c + 1}/{n_chunks} lr:{lr_c:.3e} val_bpb_so_far:{bpb_from_sums(*totals)[1]:.4f} "
                    f"elapsed:{elapsed:.1f}s eta:{elapsed / (c + 1) * (n_chunks - c - 1):.1f}s")
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for m, flag in saved_qat:
            m.qat = flag
        model.train(was_training)
    return bpb_from_sums(*totals)


# --------------------------------------------------------------------------------------------------
# Command line: score an artifact on its own

MODES = ("plain", "sliding", "ttt")


def load_eval_data(data_dir, tokenizer, vocab_size: int, *, max_val_tokens: int | None = None,
                   log: Callable[[str], None] = print) -> tuple[torch.Tensor, tuple]:
    """(validation tokens, byte LUTs) for a model of `vocab_size`. `data_dir` None: the built-in corpus
    (built and cached on first use). `tokenizer` None: `data_dir/tokenizer.model`. `max_val_tokens`
    keeps the first tokens only. Raises FileNotFoundError / ValueError naming what is missing or wrong."""
    if data_dir is None:
        info = build_builtin_corpus(vocab_size=vocab_size, log=log)
        data_dir, tokenizer = info.data_dir, tokenizer or info.tokenizer_path
    data_dir = Path(data_dir)
    if tokenizer is None:
        tokenizer = data_dir / "tokenizer.model"
        if not tokenizer.is_file():
            raise FileNotFoundError(f"no tokenizer given and {str(tokenizer)!r} does not exist; pass --tokenizer")
    sp = load_tokenizer(tokenizer)
    check_vocab(sp, vocab_size)
    tokens = load_validation_tokens(data_dir)
    if max_val_tokens is not None:
        if max_val_tokens < 2:
            raise ValueError(f"max_val_tokens must be >= 2, got {max_val_tokens}")
        tokens = tokens[:max_val_tokens]
    top = int(tokens.numpy().max()) if tokens.numel() else -1      # torch has no max() for uint16
    if top >= vocab_size:
        raise ValueError(f"validation shards in {str(data_dir)!r} hold token id {top} >= the "
                         f"model's vocab_size {vocab_size}: wrong tokenizer/data for this artifact")
    return tokens, byte_luts(sp, vocab_size)


def _parser() -> argparse.ArgumentParser:
    d = TTTConfig()
    p = argparse.ArgumentParser(prog="python -m crawler.evaluate",
                                description="Score a crawler int6 artifact: non-overlapping (plain), sliding "
                                            "window, or legal score-first TTT (SPEC §6). torchrun splits the "
                                            "work across ranks.")
    p.add_argument("--artifact", required=True, help="artifact file written by crawler.quantize")
    p.add_argument("--mode", choices=MODES, default="sliding", help="evaluation (default: sliding)")
    p.add_argument("--data-dir", help="directory with fineweb_val_*.bin shards (default: the built-in corpus)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: DATA_DIR/tokenizer.model)")
    p.add_argument("--seq-len", type=int, help="window length T (default: the artifact's train_seq_len)")
    p.add_argument("--stride", type=int, default=64, help="sliding-window stride (default 64)")
    p.add_argument("--batch-seqs", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--max-val-tokens", type=int, help="score only the first N validation tokens")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--ops", choices=OPS_CHOICES, default="auto", help="model ops (default auto)")
    p.add_argument("--dequantized", action="store_true",
                   help="score a dequantised float copy instead of computing on the packed int6 weights "
                        "(plain/sliding; TTT always trains the dequantised model)")
    p.add_argument("--ttt-epochs", type=int, default=d.epochs, help=f"TTT epochs per chunk (default {d.epochs})")
    p.add_argument("--ttt-chunk-tokens", type=int, default=d.chunk_tokens,
                   help=f"TTT chunk size in targets (default {d.chunk_tokens})")
    p.add_argument("--ttt-lr", type=float, default=d.lr, help=f"TTT peak SGD learning rate (default {d.lr})")
    p.add_argument("--ttt-batch-seqs", type=int, default=d.batch_seqs,
                   help=f"TTT sequences per step (default {d.batch_seqs})")
    return p


def _init_distributed(device_arg: str | None) -> tuple[torch.device, bool]:
    """(device, whether this call initialised torch.distributed) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_arg or (f"cuda:{local_rank}" if cuda else "cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return device, True
    return torch.device(device_arg or ("cuda" if cuda else "cpu")), False


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with a one-line `error: ...` for bad files or arguments)."""
    args = _parser().parse_args(argv)
    device, own_group = _init_distributed(args.device)
    rank = _dist_info()[0]

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    try:
        # Scoring runs on the packed int6 weights (crawler.inference); TTT trains, so it needs the
        # dequantised float model.
        int6 = args.mode != "ttt" and not args.dequantized
        load = load_int6_model if int6 else model_from_artifact
        model = load(args.artifact, device=device, ops=args.ops)
        config = model.config
        seq_len = args.seq_len or config.train_seq_len
        tokens, luts = load_eval_data(args.data_dir, args.tokenizer, config.vocab_size,
                                      max_val_tokens=args.max_val_tokens, log=log)
        t0 = time.perf_counter()
        if args.mode == "plain":
            loss, bpb = val_bpb(model, tokens, luts, seq_len=seq_len, batch_seqs=args.batch_seqs)
        elif args.mode == "sliding":
            loss, bpb = sliding_window_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                           batch_seqs=args.batch_seqs)
        else:
            ttt = TTTConfig(chunk_tokens=args.ttt_chunk_tokens, epochs=args.ttt_epochs, lr=args.ttt_lr,
                            batch_seqs=args.ttt_batch_seqs)
            loss, bpb = legal_ttt_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                      batch_seqs=args.batch_seqs, config=ttt, log=log)
        elapsed = time.perf_counter() - t0
    except (FileNotFoundError, ValueError, TypeError) as e:   # ArtifactError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if own_group:
            dist.destroy_process_group()
    log(f"mode:{args.mode} weights:{'int6' if int6 else 'dequantized'} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{elapsed:.1f}s "
        f"seq_len:{seq_len} stride:{args.stride} val_tokens:{tokens.numel()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
