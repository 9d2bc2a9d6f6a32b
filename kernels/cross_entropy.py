"""Fused softcapped cross-entropy (the fusion of PR #1787, docs/math.md §1.3), for training and evaluation:
`softcapped_cross_entropy` from the tied head's input, `softcapped_cross_entropy_from_logits` from logits
computed elsewhere.

loss_i = logsumexp_v z_iv − z_i,t_i with z = c·tanh(h·Wᵀ / c), computed without materialising the
(N, V) logits; reduced like F.cross_entropy ("mean" over the tokens whose target is not ignore_index,
"sum", or "none"). The custom ops return the per-token losses (0 where ignored); the reduction is plain
torch on those N floats, so autograd hands the backward one weight per token, g_i (g/count for "mean").

c·tanh(x/c) = 2c·σ(2x/c) − c and the constant −c cancels in the cross-entropy, so the kernels work with
z' = 2c·σ(2x/c) ∈ [0, 2c] (dz'/dx = 4σ(1 − σ)); σ and σ(1 − σ) come from one exp of −|2x/c|, so both stay
exact where the logits saturate near ±c.

Forward: one Triton kernel. A program owns BLOCK_N tokens and a range of the vocabulary; it multiplies its
token tile by successive vocabulary blocks of W on the tensor cores (fp32 accumulation), softcaps the tile and
folds it into an online max / sum-exp and the target's logit. Only the per-token log-sum-exp (N floats) is kept
for backward. The vocabulary is split over several programs only when there are too few token tiles to fill
the GPU; the partial results are merged in torch.

Backward: recompute, then matmuls. For chunks of tokens, a Triton kernel recomputes each (token × vocabulary)
logits tile and writes dlogits = g_i · (softmax − onehot) · dz/dx in the compute dtype (bf16 in training);
cuBLAS then gives dh[chunk] = dlogits @ W and dW += dlogitsᵀ @ h[chunk]. Why not a fully fused backward: each
gradient contracts a logits tile against a full 736-wide operand row, and an fp32 (tile × 736) accumulator
does not fit in registers, so a fused kernel would recompute every logits tile once per block of d (about six
extra forward matmuls). The chunked bf16 dlogits buffer (<= DLOGITS_CHUNK_BYTES) costs one write and two reads
and keeps the weight gradient deterministic: cuBLAS within a chunk, chunks summed in a fixed order in fp32,
no atomics.

From logits: a forward and a backward kernel with the same math (`_softcap_sigmoid`, `_dlogits`) and no
matmul. The forward reads each row of the logits once in
their dtype (no float32 copy); the backward writes dlogits in that dtype. float64 logits are computed in
float64 throughout (no matmul to round); every other dtype in float32.

The targets' range is checked on the device (`check_class_indices`): no host sync in either op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    autotune,
    autotune_configs,
    check_class_indices,
    check_cross_entropy_inputs,
    check_logits_cross_entropy_inputs,
    check_triton_device,
    dot_args,
    empty_output,
    gpu_or_interpreter,
    grouped_tile,
    multiprocessor_count,
    tile_matmul,
    token_bucket,
)

# Budget for one backward chunk of dlogits: 256 MiB = 16,384 tokens × 8,192 vocabulary entries in bf16.
DLOGITS_CHUNK_BYTES = 256 * 2**20

# The GPU list, as `python -m kernels.build_check` measured it (sm_90, Triton 3.9, pr1579: 65,536 tokens,
# d 736, V 8192, bf16): none spills. The softcap and online-softmax temporaries ride on the accumulator, so
# 4-warp 128-row tiles and every tile with 128 x 256 spilled (up to 560 bytes in the backward); 8 warps
# on 128 x 128 or 64 x 256 need 227-231 registers in the forward and 201-206 in the backward, so one list
# serves both kernels. Speed is not measured yet (no GPU): the list keeps two shapes for the autotuner to
# time. The interpreter's one config is small: it runs each program in Python, and the test shapes are tiny.
_CONFIGS = autotune_configs([
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
], triton.Config({"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_K": 32}))
# Vocabulary splits are multiples of the largest BLOCK_V, so every config tiles a split exactly.
_SPLIT_ALIGN = max(c.kwargs["BLOCK_V"] for c in _CONFIGS)
_NOMINAL_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _CONFIGS)


@triton.jit
def _softcap_sigmoid(x, softcap):
    """σ(2x/c) and σ(2x/c)·(1 − σ(2x/c)) from a single exp(−|2x/c|): neither overflows nor cancels."""
    t = x * (2.0 / softcap)
    e = tl.exp(-tl.abs(t))
    r = 1.0 / (1.0 + e)
    return tl.where(t >= 0, r, e * r), e * r * r


@triton.jit
def _dlogits(x, softcap, lse, tgt, cols, gw):
    """d loss / d logits for a logits tile x (rows × cols): gw_i · (softmax(z')_iv − 1[v = t_i]) · dz'/dx,
    dz'/dx = 4σ(1 − σ); lse (rows,) the log-sum-exp of z', gw (rows,) the tokens' upstream weights (0 for
    ignored tokens, whose target matches no column)."""
    sg, dsg = _softcap_sigmoid(x, softcap)
    p = tl.exp((2.0 * softcap) * sg - lse[:, None])
    dz = p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    return dz * dsg * (4.0 * gw[:, None])


# TOKENS_BUCKET (token_bucket(N)) is an autotune key only: the kernels never read it.
@autotune(_CONFIGS, key=["V", "D", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _ce_forward_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, zt_ptr, N, V, D, SPLIT_V,
                       stride_hn, stride_hd, stride_wv, stride_wd, softcap, TOKENS_BUCKET,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Per token of this program's tile, over the vocabulary range [split·SPLIT_V, (split+1)·SPLIT_V):
    lse_part = log Σ exp(z'), zt_part = z'[target] (0 when the target lies outside the range)."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_ld = rows % N
    tgt = tl.load(tgt_ptr + rows_ld)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split * SPLIT_V
    v_end = tl.minimum(v_start + SPLIT_V, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tile_matmul(h_ptr, stride_hn, stride_hd, w_ptr, stride_wd, stride_wv, rows_ld, cols % V, D,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_DTYPE, PRECISION)
        sg, _ = _softcap_sigmoid(x, softcap)
        z = tl.where((cols < V)[None, :], (2.0 * softcap) * sg, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    tl.store(lse_ptr + split * N + rows, m + tl.log(s), mask=row_ok)
    tl.store(zt_ptr + split * N + rows, zt, mask=row_ok)


@autotune(_CONFIGS, key=["V", "D", "TOKENS_BUCKET"])
@triton.jit(do_not_specialize=["TOKENS_BUCKET"])
def _ce_dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, gw_ptr, dl_ptr, N, V, D,
                       stride_hn, stride_hd, stride_wv, stride_wd, stride_dn, stride_dv, softcap,
                       TOKENS_BUCKET, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dlogits tile (`_dlogits`), recomputing z' from h and W."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), 8)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_ld = rows % N
    x = tile_matmul(h_ptr, stride_hn, stride_hd, w_ptr, stride_wd, stride_wv, rows_ld, cols % V, D,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_DTYPE, PRECISION)
    dx = _dlogits(x, softcap, tl.load(lse_ptr + rows_ld), tl.load(tgt_ptr + rows_ld), cols,
                  tl.load(gw_ptr + rows_ld))
    mask = (rows < N)[:, None] & (cols < V)[None, :]
    tl.store(dl_ptr + rows.to(tl.int64)[:, None] * stride_dn + cols[None, :] * stride_dv,
             dx.to(dl_ptr.dtype.element_ty), mask=mask)


# From logits: rows are streamed once, so the launch is fixed (no matmul tile to tune). Forward: BLOCK_N
# rows per program walk the vocabulary BLOCK_V columns at a time; backward: one (rows × columns) tile per
# program. Not measured on a GPU yet.
_LOGITS_FWD = gpu_or_interpreter({"BLOCK_N": 4, "BLOCK_V": 1024, "num_warps": 8},
                                 {"BLOCK_N": 16, "BLOCK_V": 32, "num_warps": 4})
_LOGITS_BWD = gpu_or_interpreter({"BLOCK_N": 16, "BLOCK_V": 256, "num_warps": 4},
                                 {"BLOCK_N": 16, "BLOCK_V": 32, "num_warps": 4})
_COMPUTE = {torch.float32: tl.float32, torch.float64: tl.float64}   # loss dtype -> the kernels' math


@triton.jit
def _ce_logits_forward_kernel(x_ptr, tgt_ptr, loss_ptr, lse_ptr, N, V, stride_n, stride_v, softcap, ignore_index,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr):
    """Per row: lse = log Σ exp(z') and loss = lse − z'[target] (0 where target == ignore_index), in
    COMPUTE precision, from the logits read in their own dtype."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows_ld = (rows % N).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows_ld)
    c = tl.cast(softcap, COMPUTE)
    m = tl.full((BLOCK_N,), float("-inf"), COMPUTE)
    s = tl.zeros((BLOCK_N,), COMPUTE)
    zt = tl.zeros((BLOCK_N,), COMPUTE)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        x = tl.load(x_ptr + rows_ld[:, None] * stride_n + cols[None, :] * stride_v, mask=col_ok[None, :],
                    other=0.0).to(COMPUTE)
        sg, _ = _softcap_sigmoid(x, c)
        z = tl.where(col_ok[None, :], (2.0 * c) * sg, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(tgt != ignore_index, lse - zt, 0.0), mask=row_ok)


@triton.jit
def _ce_logits_backward_kernel(x_ptr, tgt_ptr, lse_ptr, gw_ptr, dx_ptr, N, V, stride_n, stride_v, softcap,
                               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr):
    """dlogits tile (`_dlogits`) from the logits read in their dtype, written contiguous in that dtype."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_ld = (rows % N).to(tl.int64)
    col_ok = cols < V
    x = tl.load(x_ptr + rows_ld[:, None] * stride_n + cols[None, :] * stride_v, mask=col_ok[None, :],
                other=0.0).to(COMPUTE)
    dx = _dlogits(x, tl.cast(softcap, COMPUTE), tl.load(lse_ptr + rows_ld), tl.load(tgt_ptr + rows_ld), cols,
                  tl.load(gw_ptr + rows_ld))
    tl.store(dx_ptr + rows_ld[:, None] * V + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(rows < N)[:, None] & col_ok[None, :])


def _vocab_split(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary range per forward program: the whole vocabulary when the token tiles alone fill the
    GPU (two programs per SM), else an aligned fraction of it so that more programs run."""
    target = 2 * multiprocessor_count(device)
    token_tiles = triton.cdiv(n_tokens, _NOMINAL_BLOCK_N)
    splits = max(1, min(triton.cdiv(vocab, _SPLIT_ALIGN), triton.cdiv(target, token_tiles)))
    return triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    """The losses' dtype: float64 for float64 inputs, float32 for every other (docs/ops.md)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _token_weights(grad_losses: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The backward kernels' per-token weights: the upstream gradient of each token's loss, 0 where the
    target is ignore_index (its loss is the constant 0, whatever gradient reaches it)."""
    return torch.where(targets != ignore_index, grad_losses, 0.0).contiguous()


def _reduce(losses: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    """F.cross_entropy's reductions of per-token losses that are already 0 at ignored tokens: "none" as
    they are, "sum", or "mean" over the tokens not ignored (NaN when all are, as F.cross_entropy). The
    count stays on the device: no host sync."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().to(losses.dtype)


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy", mutates_args=())
def _ce_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float,
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses (N,) fp32, 0 where the target is ignore_index; per-token log-sum-exp of z' (N,)
    fp32, saved for backward)."""
    N, D = hidden.shape
    V = weight.shape[0]
    # Here, in the eagerly-run custom op, even under torch.compile; on the device, no host sync.
    check_class_indices(targets, V, ignore_index=ignore_index)
    w = weight.to(hidden.dtype)   # the reference's cast (a no-op for the bf16 tied embedding under autocast)
    split = _vocab_split(N, V, hidden.device)
    splits = triton.cdiv(V, split)
    # Flat (splits · N): with one split these are the per-token results themselves.
    lse_part = empty_output((splits * N,), torch.float32, hidden.device)
    zt_part = empty_output((splits * N,), torch.float32, hidden.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    _ce_forward_kernel[grid](hidden, w, targets, lse_part, zt_part, N, V, D, split,
                             hidden.stride(0), hidden.stride(1), w.stride(0), w.stride(1), softcap,
                             token_bucket(N), **dot_args(hidden.dtype))
    if splits == 1:
        lse, zt = lse_part, zt_part
    else:
        lse, zt = torch.logsumexp(lse_part.view(splits, N), dim=0), zt_part.view(splits, N).sum(dim=0)
    return torch.where(targets != ignore_index, lse - zt, 0.0), lse


@_ce_forward.register_fake
def _(hidden, weight, targets, softcap, ignore_index=-100):
    return (hidden.new_empty((hidden.shape[0],), dtype=torch.float32),
            hidden.new_empty((hidden.shape[0],), dtype=torch.float32))


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy_backward", mutates_args=())
def _ce_backward(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor, softcap: float, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/d hidden in hidden.dtype, d/d weight in weight.dtype) of Σ_i grad_losses_i · loss_i (grad_losses
    (N,), or 0-d: the same weight for every token)."""
    N, D = hidden.shape
    V = weight.shape[0]
    w = weight.to(hidden.dtype)
    chunk = max(1, min(N, DLOGITS_CHUNK_BYTES // (V * hidden.element_size())))
    dl = empty_output((chunk, V), hidden.dtype, hidden.device)
    dh = empty_output((N, D), hidden.dtype, hidden.device)
    # The chunks' weight gradients are summed in fp32 (fp64 for fp64 inputs), in chunk order.
    dw = torch.zeros((V, D), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    gw = _token_weights(grad_losses.to(torch.float32), targets, ignore_index)
    flags = dot_args(hidden.dtype)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        h_c, dl_c = hidden[n0:n1], dl[: n1 - n0]
        grid = lambda meta, n=n1 - n0: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        _ce_dlogits_kernel[grid](h_c, w, targets[n0:n1], lse[n0:n1], gw[n0:n1], dl_c, n1 - n0, V, D,
                                 h_c.stride(0), h_c.stride(1), w.stride(0), w.stride(1),
                                 dl_c.stride(0), dl_c.stride(1), softcap, token_bucket(n1 - n0), **flags)
        torch.mm(dl_c, w, out=dh[n0:n1])
        dw += dl_c.T @ h_c
    return dh, dw.to(weight.dtype)


@_ce_backward.register_fake
def _(grad_losses, hidden, weight, targets, lse, softcap, ignore_index=-100):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, softcap, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.softcap, ctx.ignore_index = softcap, ignore_index


def _backward(ctx, grad_losses, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    dh, dw = torch.ops.crawler_kernels.softcapped_cross_entropy_backward(grad_losses, hidden, weight, targets,
                                                                         lse, ctx.softcap, ctx.ignore_index)
    return dh, dw, None, None, None


_ce_forward.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the reference's F.linear runs in bf16 (the seed's autocast dtype); casting the inputs the
# same way keeps both paths on the same precision and lets the kernel use bf16 tensor cores.
for _device_type in ("cuda", "cpu"):
    torch.library.register_autocast("crawler_kernels::softcapped_cross_entropy", _device_type, torch.bfloat16)


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy_from_logits", mutates_args=())
def _ce_logits_forward(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                       ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses (N,), 0 where the target is ignore_index; per-token log-sum-exp of z' (N,)),
    both float32 (float64 for float64 logits)."""
    N, V = logits.shape
    check_class_indices(targets, V, ignore_index=ignore_index)
    dtype = _loss_dtype(logits)
    losses = empty_output((N,), dtype, logits.device)
    lse = empty_output((N,), dtype, logits.device)
    cfg = _LOGITS_FWD
    _ce_logits_forward_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        logits, targets, losses, lse, N, V, logits.stride(0), logits.stride(1), softcap, ignore_index,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], COMPUTE=_COMPUTE[dtype], num_warps=cfg["num_warps"])
    return losses, lse


@_ce_logits_forward.register_fake
def _(logits, targets, softcap, ignore_index):
    dtype = _loss_dtype(logits)
    return logits.new_empty((logits.shape[0],), dtype=dtype), logits.new_empty((logits.shape[0],), dtype=dtype)


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy_from_logits_backward", mutates_args=())
def _ce_logits_backward(grad_losses: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                        softcap: float, ignore_index: int) -> torch.Tensor:
    """d/d logits (N, V), contiguous in logits.dtype, of Σ_i grad_losses_i · loss_i."""
    N, V = logits.shape
    gw = _token_weights(grad_losses.to(lse.dtype), targets, ignore_index)
    dlogits = empty_output((N, V), logits.dtype, logits.device)
    cfg = _LOGITS_BWD
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _ce_logits_backward_kernel[grid](logits, targets, lse, gw, dlogits, N, V, logits.stride(0), logits.stride(1),
                                     softcap, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                                     COMPUTE=_COMPUTE[lse.dtype], num_warps=cfg["num_warps"])
    return dlogits


@_ce_logits_backward.register_fake
def _(grad_losses, logits, targets, lse, softcap, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logits_setup_context(ctx, inputs, output):
    logits, targets, softcap, ignore_index = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(logits, targets, output[1])
    ctx.softcap, ctx.ignore_index = softcap, ignore_index


def _logits_backward(ctx, grad_losses, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    dlogits = torch.ops.crawler_kernels.softcapped_cross_entropy_from_logits_backward(
        grad_losses, logits, targets, lse, ctx.softcap, ctx.ignore_index)
    return dlogits, None, None, None


_ce_logits_forward.register_autograd(_logits_backward, setup_context=_logits_setup_context)


def softcapped_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, *,
                             reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """Cross-entropy of the softcapped tied head, fused: softcap·tanh(hidden @ weight.T / softcap) is
    never materialised; logits tiles are recomputed in backward. Same contract as
    `kernels.reference.softcapped_cross_entropy` (F.cross_entropy on the softcapped logits).

    hidden (N, d) fp32/fp16/bf16/fp64 (fp64 tiles are computed in fp32), on a CUDA device (or the CPU
    under TRITON_INTERPRET=1); weight (V, d) float, the tied embedding, cast to hidden.dtype like the
    reference; targets (N,) int64 or int32, each in [0, V) or equal to ignore_index (checked on the device:
    a CUDA device-side assert, a ValueError on the CPU); softcap > 0 (a float32 kernel argument).
    reduction: "mean" (over the tokens whose target is not ignore_index; NaN when every one is), "sum",
    or "none" ((N,) per-token losses, 0 at ignored tokens, for evaluation and TTT).
    Returns float32, or float64 for float64 hidden. Differentiable in hidden and weight (ignored tokens
    contribute nothing). Under autocast the float inputs are cast to bf16 first, as the reference's
    F.linear would be.
    """
    check_cross_entropy_inputs(hidden, weight, targets, softcap, reduction=reduction, ignore_index=ignore_index)
    check_triton_device("softcapped_cross_entropy", "hidden", hidden)
    losses, _ = torch.ops.crawler_kernels.softcapped_cross_entropy(hidden, weight, targets, float(softcap),
                                                                   ignore_index)
    return _reduce(losses.to(_loss_dtype(hidden)), targets, reduction, ignore_index)


def softcapped_cross_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, softcap: float, *,
                                         reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(softcap·tanh(logits / softcap), targets) fused, for a head computed elsewhere: each
    row of the logits is read once in its own dtype (no float32 copy of the logits, no softcapped copy);
    same contract as `kernels.reference.softcapped_cross_entropy_from_logits`.

    logits (N, V) fp32/fp16/bf16/fp64, raw (before the softcap), any strides, on a CUDA device (or the CPU
    under TRITON_INTERPRET=1); targets (N,) int64/int32 in [0, V) or equal to ignore_index (checked on the
    device); softcap > 0 (a float32 kernel argument); reduction "mean" | "sum" | "none" as
    `softcapped_cross_entropy`. Math in float32 (float64 for float64 logits). Returns float32, or float64
    for float64 logits. Differentiable in logits: the gradient is (N, V) in logits.dtype.
    """
    check_logits_cross_entropy_inputs(logits, targets, softcap, reduction=reduction, ignore_index=ignore_index)
    check_triton_device("softcapped_cross_entropy_from_logits", "logits", logits)
    losses, _ = torch.ops.crawler_kernels.softcapped_cross_entropy_from_logits(logits, targets, float(softcap),
                                                                               ignore_index)
    return _reduce(losses, targets, reduction, ignore_index)
