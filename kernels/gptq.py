"""GPTQ with SDClip scales, its column walk in Triton (docs/math.md §3, §7.4).

GPTQ is sequential only along one matrix's columns; rows are independent. So for each block of
`block_size` columns a program owns BLOCK_N rows of that block in registers and walks its columns:
quantise with the row scale, error e = (w_j - s·q)/U_jj, subtract e ⊗ U[j, j+1:end] from the rest of the
block. It scatters the codes straight to their un-permuted columns and writes the block's errors E; the
trailing update W[:, end:] -= E @ U[blk, end:] is one batched torch matmul. Everything before the walk
(SDClip scales, dead columns, damping, act-order, the Cholesky factor of H⁻¹ with its retries) is
`kernels.reference.gptq_prepare`, shared with the reference, in torch.

Same-shape matrices are quantised together (`gptq_quantize_batched`): one launch per column block for
the whole batch instead of one per matrix. No atomics: results are deterministic for a given batch.

Precision: the walk runs in float32 (float64 weights are computed in float32 here, unlike the
reference); the trailing matmul follows torch's float32 matmul setting (TF32 if the caller enabled it).
Like every Triton op, both functions need CUDA tensors (or TRITON_INTERPRET=1 on the CPU);
`kernels.reference.gptq_quantize` is the CPU path (same results up to rounding-order differences).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .utils import (
    autotune,
    autotune_configs,
    check_gptq_args,
    check_gptq_inputs,
    check_gptq_values,
    check_triton_device,
    empty_output,
)

# A program holds a BLOCK_N × BLOCK_K float32 tile; past this many elements it would spill registers.
_MAX_TILE = 8192

# GPU list: `python -m kernels.build_check` (sm_90, Triton 3.9, the model's matrix shapes, 128-column
# blocks): 95-162 registers, no spills. The interpreter's one config has few programs: it pays per op.
_CONFIGS = autotune_configs([triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((8, 1), (16, 2), (32, 4),
                                                                                       (64, 4))],
                            triton.Config({"BLOCK_N": 64}, num_warps=1))


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs whose tile fits in registers (the smallest one if none does: it then spills,
    which is slow but correct; only block sizes above 1024 get there)."""
    block_k = {**named_args, **kwargs}["BLOCK_K"]
    fitting = [c for c in configs if c.kwargs["BLOCK_N"] * block_k <= _MAX_TILE]
    return fitting or configs[:1]


@triton.jit
def _round_half_even(x):
    """Round to the nearest integer, ties to even (as torch.round). Exact: x - floor(x) has no rounding
    error, unlike floor(x + 0.5), which turns 0.49999997 into 1."""
    f = tl.floor(x)
    frac = x - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return f + tl.where(frac > 0.5, 1.0, 0.0) + tl.where(frac == 0.5, odd, 0.0)


@autotune(_CONFIGS, key=["N", "BLOCK_K"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _gptq_block_kernel(w_ptr, u_ptr, s_ptr, perm_ptr, codes_ptr, err_ptr,
                       N, K, start, width, err_stride,
                       R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (row tile, matrix) program for the column block [start, start + width) of every matrix.

    w (M, N, K) permuted working weights, u (M, K, K) upper Cholesky factor of H⁻¹, s (M, N) scales,
    perm (M, K) act-order permutation; writes codes (M, N, K) int8 at the original column perm[j] and
    err (M, N, err_stride) the block's scaled errors in columns [0, width).
    """
    m = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < width

    w = tl.load(w_ptr + m * N * K + rows[:, None] * K + (start + cols)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    s = tl.load(s_ptr + m * N + rows, mask=row_ok, other=1.0)
    u_block = u_ptr + m * K * K + start * K + start              # U[m, start, start]
    codes_rows = codes_ptr + m * N * K + rows * K
    err_rows = err_ptr + m * N * err_stride + rows * err_stride

    # U's row j of the block and its diagonal entry are loaded one column ahead, so their latency hides
    # behind column j - 1 (the last column re-loads its own row rather than reading past the block).
    u_next = tl.load(u_block + cols, mask=col_ok, other=0.0)
    u_jj_next = tl.load(u_block)
    for j in range(0, width):
        u_row, u_jj = u_next, u_jj_next
        ahead = tl.minimum(j + 1, width - 1)
        u_next = tl.load(u_block + ahead * K + cols, mask=col_ok, other=0.0)
        u_jj_next = tl.load(u_block + ahead * (K + 1))
        # Column j of the register tile: a masked row sum (registers cannot be indexed dynamically).
        w_j = tl.sum(tl.where(cols[None, :] == j, w, 0.0), axis=1)
        # div_rn: IEEE division like torch's (a plain fp32 `/` is approximate on GPUs).
        x = tl.minimum(tl.maximum(tl.math.div_rn(w_j, s), -R), R)   # clamp-then-round == round-then-clamp
        q = _round_half_even(x)
        e = tl.math.div_rn(w_j - s * q, u_jj)
        w -= e[:, None] * tl.where(cols > j, u_row, 0.0)[None, :]
        dest = tl.load(perm_ptr + m * K + start + j)
        tl.store(codes_rows + dest, q.to(tl.int8), mask=row_ok)
        tl.store(err_rows + j, e, mask=row_ok)


def _gptq_walk(weights: torch.Tensor, hessians: torch.Tensor, bits: int, clip_sigmas: float,
               block_size: int, act_order: bool, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of a batch (M, N, K) with the Triton column walk; inputs already validated."""
    W, U, scales, perm = reference.gptq_prepare(weights.float(), hessians, bits=bits, clip_sigmas=clip_sigmas,
                                                act_order=act_order, damp=damp)
    return _column_walk(W, U, scales, perm, bits, block_size), scales


def _column_walk(W: torch.Tensor, U: torch.Tensor, scales: torch.Tensor, perm: torch.Tensor, bits: int,
                 block_size: int) -> torch.Tensor:
    """The Triton part of GPTQ on `reference.gptq_prepare`'s outputs: W (M, N, K) float32 permuted working
    weights, U (M, K, K) float32 upper Cholesky factor of H⁻¹, scales (M, N) fp16, perm (M, K) int64.
    Returns the un-permuted codes int8 (M, N, K)."""
    M, N, K = W.shape
    # The kernel indexes rows with fixed strides (cholesky(upper=True) returns a transposed view).
    W, U, perm = W.contiguous(), U.contiguous(), perm.contiguous()
    s = scales.float().contiguous()
    codes = empty_output((M, N, K), torch.int8, W.device)
    block_size = min(block_size, K)
    err = torch.empty((M, N, block_size), dtype=W.dtype, device=W.device)
    block_k = triton.next_power_of_2(block_size)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
    for start in range(0, K, block_size):
        end = min(start + block_size, K)
        _gptq_block_kernel[grid](W, U, s, perm, codes, err, N, K, start, end - start, block_size,
                                 R=reference.quant_max(bits), BLOCK_K=block_k)
        if end < K:
            W[:, :, end:].baddbmm_(err[:, :, :end - start], U[:, start:end, end:], alpha=-1.0)
    return codes


@torch.library.custom_op("crawler_kernels::gptq_quantize_batched", mutates_args=())
def _gptq_quantize_batched_op(weights: torch.Tensor, hessians: torch.Tensor, bits: int, clip_sigmas: float,
                              block_size: int, act_order: bool, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_gptq_values(weights, hessians)
    return _gptq_walk(weights, hessians, bits, clip_sigmas, block_size, act_order, damp)


@_gptq_quantize_batched_op.register_fake
def _(weights, hessians, bits, clip_sigmas, block_size, act_order, damp):
    return (weights.new_empty(weights.shape, dtype=torch.int8),
            weights.new_empty(weights.shape[:-1], dtype=torch.float16))


def gptq_quantize_batched(weights: torch.Tensor, hessians: torch.Tensor, *, bits: int = 6,
                          clip_sigmas: float = 12.85, block_size: int = 128, act_order: bool = True,
                          damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ + SDClip of M same-shape matrices in one pass (one kernel launch per column block).

    weights (M, N, K) float, hessians (M, K, K) float, same CUDA device (or the CPU under
    TRITON_INTERPRET=1), finite. Settings as in `gptq_quantize`. Returns (codes int8 (M, N, K) in [-R, R],
    scales float16 (M, N)); matrix i's result is that of gptq_quantize(weights[i], hessians[i]).
    """
    check_gptq_inputs(weights, hessians, batched=True)
    check_gptq_args(bits, clip_sigmas, block_size, damp)
    check_triton_device("gptq_quantize_batched", "weights", weights,
                        reference="kernels.reference.gptq_quantize (one matrix at a time)")
    return _gptq_quantize_batched_op(weights, hessians, bits, float(clip_sigmas), block_size, bool(act_order),
                                     float(damp))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int = 6, clip_sigmas: float = 12.85,
                  block_size: int = 128, act_order: bool = True,
                  damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022) with SDClip per-row scales, column walk in Triton (docs/math.md §3, §7.4).

    weight (N, K) float, hessian (K, K) float (XᵀX/n of the layer's inputs), same CUDA device (or the CPU
    under TRITON_INTERPRET=1), finite.
    bits in 2..8 (R = 2^(bits-1) - 1), clip_sigmas k of the scale s_r = k·std(W_r)/R, block_size columns
    per lazy-update block, act_order (descending diag H), damp (fraction of mean diag H added).
    Returns (codes int8 (N, K) in [-R, R], scales float16 (N,)); dequantise with codes * scales.float().
    Same algorithm and signature as `kernels.reference.gptq_quantize`.
    """
    check_gptq_inputs(weight, hessian)
    check_triton_device("gptq_quantize", "weight", weight)
    codes, scales = gptq_quantize_batched(weight[None], hessian[None], bits=bits, clip_sigmas=clip_sigmas,
                                          block_size=block_size, act_order=act_order, damp=damp)
    return codes[0], scales[0]
