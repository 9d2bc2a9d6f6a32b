"""Bits per byte (docs/math.md §6), the pieces every evaluation shares: the UTF-8 bytes each target
stands for, loss and bpb from float64 sums, the all-reduce of those sums across ranks, the sliding-window
plan (the fixed filter: every target scored exactly once) and the batched scoring of planned windows.
crawler.evaluate (plain, sliding window) and crawler.ttt (legal score-first TTT) are built from them."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .documents import document_segments
from .runtime import Progress, autocast, rank_and_world, to_device


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
    if rank_and_world()[1] > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


class Window(NamedTuple):
    """One evaluation window: inputs tokens[start : start + length], targets tokens[start + 1 :
    start + length + 1]; window positions [score_from, length) are scored."""
    start: int
    length: int
    score_from: int


def plan_windows(n_targets: int, seq_len: int, stride: int = 64) -> torch.Tensor:
    """The sliding windows over `n_targets` targets (docs/math.md §6, the fixed filter), as an (W, 3) int64
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


def window_nll(model, x: torch.Tensor, y: torch.Tensor, *, doc_isolated: bool,
               x_cpu: torch.Tensor | None = None) -> torch.Tensor:
    """`model.token_nll(x, y)`: per-token nats (B, T) of windows x, y (B, T) int64; with `doc_isolated`,
    with the windows' document segments (crawler.documents), so no window attends across a BOS. The
    segments are derived from `x_cpu`, x's values on the CPU, when given, and moved to x's device (no
    device sync: deriving them from ids on a GPU reads them back to the host), else from x itself. Any
    model with a `token_nll(x, y)` works without isolation."""
    if not doc_isolated:
        return model.token_nll(x, y)
    return model.token_nll(x, y, document_segments(x if x_cpu is None else x_cpu).to(x.device))


def score_windows(model, tokens: torch.Tensor, luts, windows: torch.Tensor, *, seq_len: int,
                  batch_seqs: int, sums: torch.Tensor, progress: Progress | None = None,
                  doc_isolated: bool = False) -> None:
    """Add (nats, targets, bytes) over the scored positions of `windows` ((W, 3) rows from plan_windows,
    sorted by start) to `sums` (float64 (3,), on the model's device). Windows run `batch_seqs` at a time,
    padded to seq_len; padding repeats the last real position and is never counted (causal model).
    With `doc_isolated`, each window is cut at its BOS tokens (`window_nll`): a target is predicted from
    its own document's tokens in the window only. `progress` advances by one per window."""
    device = sums.device
    pos = torch.arange(seq_len)
    for b0 in range(0, windows.shape[0], batch_seqs):
        starts, lengths, score_from = windows[b0:b0 + batch_seqs].unbind(1)
        lo = int(starts[0])
        # Only the span of tokens this batch touches goes to the device, as int64 (the stream lives on the CPU).
        span_cpu = tokens[lo:int((starts + lengths).max()) + 1].to(torch.int64)
        rel_cpu = torch.minimum((starts - lo)[:, None] + pos, (starts + lengths - 1 - lo)[:, None])
        span, rel = to_device(span_cpu, device), to_device(rel_cpu, device)
        scored = to_device((pos >= score_from[:, None]) & (pos < lengths[:, None]), device)
        x, y = span[rel], span[rel + 1]
        with autocast(device):
            nll = window_nll(model, x, y, doc_isolated=doc_isolated,
                             x_cpu=span_cpu[rel_cpu] if doc_isolated else None)
        # masked sums, not boolean indexing: an index by a mask reads its count back to the host
        sums[0] += torch.where(scored, nll.double(), 0.0).sum()
        sums[1] += scored.sum()
        sums[2] += torch.where(scored, target_bytes(x, y, luts), 0.0).sum()
        if progress is not None:
            progress.update(starts.numel())


def check_stream(tokens: torch.Tensor, seq_len: int) -> int:
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


def luts_on(luts, device: torch.device) -> tuple:
    """The byte LUTs moved to `device`."""
    return tuple(t.to(device) for t in luts)
