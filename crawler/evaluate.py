"""Validation bits per byte (SPEC §6): non-overlapping windows, float64 sums, all-reduced across ranks."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


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
    was_training = model.training
    model.eval()
    try:
        for start in range(lo, hi, batch_seqs):
            x = x_all[start: min(start + batch_seqs, hi)].to(device)
            y = y_all[start: min(start + batch_seqs, hi)].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                nll = model.token_nll(x, y)
            sums[0] += nll.double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts).sum()
    finally:
        model.train(was_training)
    nats, count, nbytes = all_reduce_sums(sums).tolist()
    return bpb_from_sums(nats, count, nbytes)
