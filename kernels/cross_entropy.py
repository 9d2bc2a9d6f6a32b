"""Fused softcapped cross-entropy of the tied head (the fusion of PR #1787, docs/math.md §1.3), training
only.

loss = mean_i [ logsumexp_v z_iv − z_i,t_i ] with z = c·tanh(h·Wᵀ / c), computed without materialising the
(N, V) logits. c·tanh(x/c) = 2c·σ(2x/c) − c and the constant −c cancels in the cross-entropy, so the kernels
work with z' = 2c·σ(2x/c) ∈ [0, 2c] (dz'/dx = 4σ(1 − σ)); σ and σ(1 − σ) come from one exp of −|2x/c|, so
both stay exact where the logits saturate near ±c.

Forward: one Triton kernel. A program owns BLOCK_N tokens and a range of the vocabulary; it multiplies its
token tile by successive vocabulary blocks of W on the tensor cores (fp32 accumulation), softcaps the tile and
folds it into an online max / sum-exp and the target's logit. Only the per-token log-sum-exp (N floats) is kept
for backward. The vocabulary is split over several programs only when there are too few token tiles to fill
the GPU; the partial results are merged in torch.

Backward: recompute, then matmuls. For chunks of tokens, a Triton kernel recomputes each (token × vocabulary)
logits tile and writes dlogits = g/N · (softmax − onehot) · dz/dx in the compute dtype (bf16 in training);
cuBLAS then gives dh[chunk] = dlogits @ W and dW += dlogitsᵀ @ h[chunk]. Why not a fully fused backward: each
gradient contracts a logits tile against a full 736-wide operand row, and an fp32 (tile × 736) accumulator
does not fit in registers, so a fused kernel would recompute every logits tile once per block of d (about six
extra forward matmuls). The chunked bf16 dlogits buffer (<= DLOGITS_CHUNK_BYTES) costs one write and two reads
and keeps the weight gradient deterministic: cuBLAS within a chunk, chunks summed in a fixed order in fp32,
no atomics.

Evaluation keeps the exact eager path (`kernels.reference.softcapped_logits` + F.cross_entropy).
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
    check_triton_device,
    dot_args,
    empty_output,
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
def _ce_dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, dl_ptr, N, V, D,
                       stride_hn, stride_hd, stride_wv, stride_wd, stride_dn, stride_dv, softcap, inv_n,
                       TOKENS_BUCKET, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """dlogits tile = g/N · (exp(z' − lse) − 1[v = target]) · 4σ(1 − σ), recomputing z' from h and W."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), 8)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_ld = rows % N
    x = tile_matmul(h_ptr, stride_hn, stride_hd, w_ptr, stride_wd, stride_wv, rows_ld, cols % V, D,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_DTYPE, PRECISION)
    sg, dsg = _softcap_sigmoid(x, softcap)
    lse = tl.load(lse_ptr + rows_ld)
    tgt = tl.load(tgt_ptr + rows_ld)
    scale = tl.load(g_ptr).to(tl.float32) * inv_n
    p = tl.exp((2.0 * softcap) * sg - lse[:, None])
    dz = p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dx = dz * dsg * (4.0 * scale)
    mask = (rows < N)[:, None] & (cols < V)[None, :]
    tl.store(dl_ptr + rows.to(tl.int64)[:, None] * stride_dn + cols[None, :] * stride_dv,
             dx.to(dl_ptr.dtype.element_ty), mask=mask)


def _vocab_split(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary range per forward program: the whole vocabulary when the token tiles alone fill the
    GPU (two programs per SM), else an aligned fraction of it so that more programs run."""
    target = 2 * multiprocessor_count(device)
    token_tiles = triton.cdiv(n_tokens, _NOMINAL_BLOCK_N)
    splits = max(1, min(triton.cdiv(vocab, _SPLIT_ALIGN), triton.cdiv(target, token_tiles)))
    return triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy", mutates_args=())
def _ce_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss 0-d fp32, per-token log-sum-exp of z' (N,) fp32, saved for backward)."""
    N, D = hidden.shape
    V = weight.shape[0]
    # Here, in the eagerly-run custom op, even under torch.compile: one host sync per call, since
    # out-of-range targets would otherwise silently give a wrong loss.
    check_class_indices(targets, V)
    w = weight.to(hidden.dtype)   # the reference's cast (a no-op for the bf16 tied embedding under autocast)
    split = _vocab_split(N, V, hidden.device)
    splits = triton.cdiv(V, split)
    # Flat (splits · N): with one split these are the per-token results themselves (no view returned).
    lse_part = empty_output((splits * N,), torch.float32, hidden.device)
    zt_part = empty_output((splits * N,), torch.float32, hidden.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)  # noqa: E731
    _ce_forward_kernel[grid](hidden, w, targets, lse_part, zt_part, N, V, D, split,
                             hidden.stride(0), hidden.stride(1), w.stride(0), w.stride(1), softcap,
                             token_bucket(N), **dot_args(hidden.dtype))
    if splits == 1:
        return (lse_part - zt_part).mean(), lse_part
    lse = torch.logsumexp(lse_part.view(splits, N), dim=0)
    return (lse - zt_part.view(splits, N).sum(dim=0)).mean(), lse


@_ce_forward.register_fake
def _(hidden, weight, targets, softcap):
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((hidden.shape[0],), dtype=torch.float32))


@torch.library.custom_op("crawler_kernels::softcapped_cross_entropy_backward", mutates_args=())
def _ce_backward(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 lse: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss/d hidden in hidden.dtype, d loss/d weight in weight.dtype) for the upstream scalar `grad`."""
    N, D = hidden.shape
    V = weight.shape[0]
    w = weight.to(hidden.dtype)
    chunk = max(1, min(N, DLOGITS_CHUNK_BYTES // (V * hidden.element_size())))
    dl = empty_output((chunk, V), hidden.dtype, hidden.device)
    dh = empty_output((N, D), hidden.dtype, hidden.device)
    # The chunks' weight gradients are summed in fp32 (fp64 for fp64 inputs), in chunk order.
    dw = torch.zeros((V, D), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    grad = grad.to(torch.float32)
    flags = dot_args(hidden.dtype)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        h_c, dl_c = hidden[n0:n1], dl[: n1 - n0]
        grid = lambda meta, n=n1 - n0: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        _ce_dlogits_kernel[grid](h_c, w, targets[n0:n1], lse[n0:n1], grad, dl_c, n1 - n0, V, D,
                                 h_c.stride(0), h_c.stride(1), w.stride(0), w.stride(1),
                                 dl_c.stride(0), dl_c.stride(1), softcap, 1.0 / N, token_bucket(n1 - n0), **flags)
        torch.mm(dl_c, w, out=dh[n0:n1])
        dw += dl_c.T @ h_c
    return dh, dw.to(weight.dtype)


@_ce_backward.register_fake
def _(grad, hidden, weight, targets, lse, softcap):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, softcap = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.softcap = softcap


def _backward(ctx, grad_loss, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    dh, dw = torch.ops.crawler_kernels.softcapped_cross_entropy_backward(grad_loss, hidden, weight, targets,
                                                                         lse, ctx.softcap)
    return dh, dw, None, None


_ce_forward.register_autograd(_backward, setup_context=_setup_context)
# Under autocast the reference's F.linear runs in bf16 (the seed's autocast dtype); casting the inputs the
# same way keeps both paths on the same precision and lets the kernel use bf16 tensor cores.
for _device_type in ("cuda", "cpu"):
    torch.library.register_autocast("crawler_kernels::softcapped_cross_entropy", _device_type, torch.bfloat16)


def softcapped_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             softcap: float) -> torch.Tensor:
    """Mean cross-entropy of the softcapped tied head, fused: softcap·tanh(hidden @ weight.T / softcap)
    is never materialised; logits tiles are recomputed in backward.

    hidden (N, d) fp32/fp16/bf16/fp64 (fp64 tiles are computed in fp32), on a CUDA device (or the CPU
    under TRITON_INTERPRET=1); weight (V, d) float, the tied embedding, cast to hidden.dtype like the
    reference; targets (N,) int64 or int32, every value in [0, V) (unlike F.cross_entropy there is no
    ignore_index); softcap > 0. Returns a 0-d float32 tensor.
    Differentiable in hidden and weight. Under autocast the float inputs are cast to bf16 first, as the
    reference's F.linear would be.
    """
    check_cross_entropy_inputs(hidden, weight, targets, softcap)
    check_triton_device("softcapped_cross_entropy", "hidden", hidden)
    loss, _ = torch.ops.crawler_kernels.softcapped_cross_entropy(hidden, weight, targets, float(softcap))
    return loss
