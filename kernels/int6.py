"""Int6 weights at inference (docs/math.md §5): 4 codes in 3 bytes, and a weight-only matmul on packed weights.

Packed layout (what `pack_int6` writes; the kernels below read it)
------------------------------------------------------------------
Codes c in [-32, 31] are stored biased, u = c + 32 in [0, 63] (6 bits). A weight row of K codes
(K % 4 == 0, K4 = K/4) is cut into four quarters: quarter q holds columns q*K4 .. q*K4 + K4 - 1, and
u[q][j] is the code of column q*K4 + j. The row's 3*K4 bytes are three planes of K4 bytes each:

    byte j          (plane LO01):  u[0][j] & 15  |  (u[1][j] & 15) << 4
    byte K4 + j     (plane LO23):  u[2][j] & 15  |  (u[3][j] & 15) << 4
    byte 2*K4 + j   (plane HI):    u[0][j] >> 4  |  (u[1][j] >> 4) << 2  |  (u[2][j] >> 4) << 4
                                   |  (u[3][j] >> 4) << 6

so packed is (N, 3K/4) uint8, exactly 0.75 bytes per weight, and rows stay independent (row n of the
weight is row n of packed). Why this layout: a kernel tile of BQ consecutive j reads three contiguous
BQ-byte runs (one per plane) and gets the codes of FOUR column runs (one per quarter) with shifts and
masks only; no interleaving, gathers or cross-byte fields. The matching activations are the four
contiguous runs x[q*K4 + j], so the K reduction is done as four sub-products per tile. The layout does
not depend on any tile size, so one packed weight serves every kernel configuration and every K.
Loads are as wide as the alignment of K4 allows (the kernels are told the largest power of two, up to 16,
dividing K4): 16-byte vectors for K % 64 == 0 (K = 2944), 8-byte ones for K = 736.

The matmul
----------
`int6_linear(x, packed, scales)` = x @ (codes * scales[:, None]).T, fp32 accumulation, the per-row scale
applied in the epilogue, output in x.dtype. Codes are unpacked in registers; no dequantised weight is
ever written to memory. Two paths, by M = number of rows of x:
  * decode (M <= 16): one program per (block of BN weight rows, K split); M == 1 multiplies and
    accumulates elementwise (no tensor core tile is wasted on one row), 2 <= M <= 16 uses tl.dot with the
    weight tile as the left operand. With split-K each split writes fp32 partials and a second kernel
    sums them in a fixed order (deterministic, no float atomics), then scales and casts.
  * prefill (M > 16): a tiled tl.dot GEMM with grouped program ordering.
Configurations are timed once per (path, shape, dtype, device name) on a GPU (a small candidate set, timing
the whole op, the split-K reduction included) and the choice is kept on disk for later processes
(`kernels.utils.PersistentChoices`); under the interpreter there is exactly one configuration.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from .reference import pack_int6, unpack_int6  # plain torch, run once: the reference IS the implementation
from .utils import (
    PersistentChoices,
    check_int6_linear_inputs,
    check_triton_device,
    dot_args,
    empty_output,
    gpu_or_interpreter,
    grouped_tile,
    multiprocessor_count,
    pow2_divisor,
)

__all__ = ["pack_int6", "unpack_int6", "int6_linear"]

DECODE_MAX_M = 16          # rows of x up to which the decode (GEMV / split-K) path runs
_REDUCE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _unpack_codes(w_rows, j, K4, MASKED: tl.constexpr):
    """Codes (int32) of the four quarters at quarter-column indices j (1, BQ) for the weight rows whose
    first bytes are w_rows (BN, 1): four (BN, BQ) tiles, quarter q covering columns q*K4 + j."""
    if MASKED:
        ok = j < K4
        lo01 = tl.load(w_rows + j, mask=ok, other=0)
        lo23 = tl.load(w_rows + K4 + j, mask=ok, other=0)
        hi = tl.load(w_rows + 2 * K4 + j, mask=ok, other=0)
    else:
        lo01 = tl.load(w_rows + j)
        lo23 = tl.load(w_rows + K4 + j)
        hi = tl.load(w_rows + 2 * K4 + j)
    lo01 = lo01.to(tl.int32)
    lo23 = lo23.to(tl.int32)
    hi = hi.to(tl.int32)
    # each quarter's top 2 bits land at bits 4-5 of its biased code (48 = 0b110000)
    c0 = ((lo01 & 15) | ((hi << 4) & 48)) - 32
    c1 = ((lo01 >> 4) | ((hi << 2) & 48)) - 32
    c2 = ((lo23 & 15) | (hi & 48)) - 32
    c3 = ((lo23 >> 4) | ((hi >> 2) & 48)) - 32
    return c0, c1, c2, c3


@triton.jit
def _load_x_quarters(x_rows, j, K4, MASKED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Activations matching `_unpack_codes`: four (BM, BQ) tiles x[:, q*K4 + j] in DOT_DTYPE. Masked
    columns read 0, so the (arbitrary) codes they meet contribute nothing."""
    if MASKED:
        ok = j < K4
        x0 = tl.load(x_rows + j, mask=ok, other=0.0)
        x1 = tl.load(x_rows + K4 + j, mask=ok, other=0.0)
        x2 = tl.load(x_rows + 2 * K4 + j, mask=ok, other=0.0)
        x3 = tl.load(x_rows + 3 * K4 + j, mask=ok, other=0.0)
    else:
        x0 = tl.load(x_rows + j)
        x1 = tl.load(x_rows + K4 + j)
        x2 = tl.load(x_rows + 2 * K4 + j)
        x3 = tl.load(x_rows + 3 * K4 + j)
    return x0.to(DOT_DTYPE), x1.to(DOT_DTYPE), x2.to(DOT_DTYPE), x3.to(DOT_DTYPE)


@triton.jit
def _mma_quarters(acc, c0, c1, c2, c3, x0, x1, x2, x3, W_FIRST: tl.constexpr, DOT_DTYPE: tl.constexpr,
                  PRECISION: tl.constexpr):
    """acc += codes-times-activations over the four quarters with tl.dot. W_FIRST: acc is (BN, BM) and
    the unpacked weight is the left operand (it can stay in registers); otherwise acc is (BM, BN)."""
    if W_FIRST:
        acc = tl.dot(c0.to(DOT_DTYPE), tl.trans(x0), acc, input_precision=PRECISION)
        acc = tl.dot(c1.to(DOT_DTYPE), tl.trans(x1), acc, input_precision=PRECISION)
        acc = tl.dot(c2.to(DOT_DTYPE), tl.trans(x2), acc, input_precision=PRECISION)
        acc = tl.dot(c3.to(DOT_DTYPE), tl.trans(x3), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(x0, tl.trans(c0.to(DOT_DTYPE)), acc, input_precision=PRECISION)
        acc = tl.dot(x1, tl.trans(c1.to(DOT_DTYPE)), acc, input_precision=PRECISION)
        acc = tl.dot(x2, tl.trans(c2.to(DOT_DTYPE)), acc, input_precision=PRECISION)
        acc = tl.dot(x3, tl.trans(c3.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _int6_decode_kernel(x_ptr, w_ptr, s_ptr, out_ptr, part_ptr, M, N, K4, stride_xm,
                        BM: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr, SPLIT_K: tl.constexpr,
                        ALIGN: tl.constexpr, MASK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Grid (cdiv(N, BN), SPLIT_K); all M <= BM rows of x in one program. BM == 1: elementwise FMA into a
    (BN, BQ) accumulator reduced once at the end; BM >= 16: tl.dot. SPLIT_K == 1 writes the scaled output,
    otherwise fp32 partials part[pid_k, m, n] for `_splitk_reduce_kernel`."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    K4 = (K4 // ALIGN) * ALIGN  # the host guarantees ALIGN | K4; spelt so, Triton can prove it (wide loads)
    n = pid_n * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    # clamped rows: loads need no row masks; the extra rows are dropped at the store
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * (3 * K4)
    x_rows = x_ptr + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm
    per_split = tl.cdiv(tl.cdiv(K4, SPLIT_K), BQ) * BQ
    j_lo = pid_k * per_split
    j_hi = tl.minimum(j_lo + per_split, K4)
    if BM == 1:
        acc = tl.zeros([BN, BQ], dtype=tl.float32)
    else:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BQ):
        j = j0 + tl.arange(0, BQ)[None, :]
        c0, c1, c2, c3 = _unpack_codes(w_rows, j, K4, MASK_K)
        x0, x1, x2, x3 = _load_x_quarters(x_rows, j, K4, MASK_K, DOT_DTYPE)
        if BM == 1:
            acc += (c0.to(tl.float32) * x0.to(tl.float32) + c1.to(tl.float32) * x1.to(tl.float32)
                    + c2.to(tl.float32) * x2.to(tl.float32) + c3.to(tl.float32) * x3.to(tl.float32))
        else:
            acc = _mma_quarters(acc, c0, c1, c2, c3, x0, x1, x2, x3, True, DOT_DTYPE, PRECISION)
    if BM == 1:
        res = tl.sum(acc, axis=1)[:, None]
    else:
        res = acc
    keep = (n[:, None] < N) & (m[None, :] < M)
    offs = m[None, :] * N + n[:, None]            # out / part rows are contiguous, allocated by the host
    if SPLIT_K == 1:
        scale = tl.load(s_ptr + tl.minimum(n, N - 1)).to(tl.float32)
        tl.store(out_ptr + offs, (res * scale[:, None]).to(out_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(part_ptr + pid_k * M * N + offs, res, mask=keep)


@triton.jit
def _splitk_reduce_kernel(part_ptr, s_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out.flat[i] = (sum over s = 0..SPLIT_K-1, in that order, of part[s].flat[i]) * scales[i % N]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.load(part_ptr + i, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + i, mask=ok, other=0.0)
    scale = tl.load(s_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int6_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K4, stride_xm,
                      BM: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr, GROUP_M: tl.constexpr,
                      W_FIRST: tl.constexpr, ALIGN: tl.constexpr, MASK_K: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(M, BM) * cdiv(N, BN),); one (BM, BN) output tile per program, the K loop in steps of
    4*BQ columns (BQ per quarter). GROUP_M consecutive programs share a weight tile while it is in L2."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    K4 = (K4 // ALIGN) * ALIGN  # see _int6_decode_kernel
    m = pid_m * BM + tl.arange(0, BM)
    n = pid_n * BN + tl.arange(0, BN)
    w_rows = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * (3 * K4)
    x_rows = x_ptr + tl.minimum(m, M - 1).to(tl.int64)[:, None] * stride_xm
    if W_FIRST:
        acc = tl.zeros([BN, BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
    for j0 in range(0, K4, BQ):
        j = j0 + tl.arange(0, BQ)[None, :]
        c0, c1, c2, c3 = _unpack_codes(w_rows, j, K4, MASK_K)
        x0, x1, x2, x3 = _load_x_quarters(x_rows, j, K4, MASK_K, DOT_DTYPE)
        acc = _mma_quarters(acc, c0, c1, c2, c3, x0, x1, x2, x3, W_FIRST, DOT_DTYPE, PRECISION)
    if W_FIRST:
        acc = tl.trans(acc)
    scale = tl.load(s_ptr + tl.minimum(n, N - 1)).to(tl.float32)
    keep = (m[:, None] < M) & (n[None, :] < N)
    tl.store(out_ptr + m.to(tl.int64)[:, None] * N + n[None, :],
             (acc * scale[None, :]).to(out_ptr.dtype.element_ty), mask=keep)


# ----------------------------------------------------------------------------------------------
# Launch configurations and their tuning
# ----------------------------------------------------------------------------------------------

class _Config(NamedTuple):
    """One launch configuration. path "decode": BM is 1 (FMA) or 16 (tl.dot), SPLIT_K splits K.
    path "gemm": GROUP_M program grouping, W_FIRST puts the weight tile on tl.dot's left."""
    path: str
    BM: int
    BN: int
    BQ: int
    SPLIT_K: int = 1
    GROUP_M: int = 1
    W_FIRST: bool = False
    num_warps: int = 4
    num_stages: int = 2


def _gpu_candidates(M: int, N: int, K4: int, device: torch.device) -> list[_Config]:
    """The configurations worth timing for this problem on a GPU."""
    if M <= DECODE_MAX_M:
        BM = 1 if M == 1 else 16
        # (BN, BQ, warps), as `python -m kernels.build_check` measured them (sm_90, Triton 3.9, bf16 x at the
        # model's shapes): 63-126 registers for one row, 72-159 for 2-16, no spills. 2-16 rows: 32 x 32 runs
        # on 2 warps, since on 4 ptxas spilled it at K = 736 without split-K (16 bytes at 80 registers).
        tiles = [(16, 64, 4), (32, 64, 4), (8, 128, 4)] if M == 1 else [(32, 32, 2), (64, 32, 4), (64, 64, 4)]
        sms = multiprocessor_count(device)
        out = []
        for BN, BQ, warps in tiles:
            # no split, and splits that fill about half / one wave of SMs
            n_tiles = max(1, triton.cdiv(K4, BQ))
            wave = max(1, min(n_tiles, triton.cdiv(sms, triton.cdiv(N, BN))))
            out += [_Config("decode", BM, BN, BQ, SPLIT_K=s, num_warps=warps)
                    for s in sorted({1, triton.cdiv(wave, 2), wave})]
        return out
    # (`python -m kernels.build_check`, sm_90, Triton 3.9, bf16 x at the model's shapes: 93-156 registers,
    # no spills)
    cands = [
        _Config("gemm", 128, 128, 16, GROUP_M=8, num_warps=8, num_stages=4),
        _Config("gemm", 128, 128, 16, GROUP_M=8, W_FIRST=True, num_warps=8, num_stages=4),
        _Config("gemm", 128, 128, 32, GROUP_M=8, num_warps=8, num_stages=3),
        _Config("gemm", 64, 64, 32, GROUP_M=8, num_warps=4, num_stages=4),
    ]
    if M <= 64:
        cands.append(_Config("gemm", 32, 128, 32, GROUP_M=8, W_FIRST=True, num_warps=4, num_stages=4))
    return cands


def _interpreter_candidate(M: int, K4: int) -> _Config:
    """The interpreter's one configuration: small tiles, and two K splits on the decode path whenever K
    allows, so the CPU tests exercise the split-K reduction."""
    if M <= DECODE_MAX_M:
        return _Config("decode", 1 if M == 1 else 16, 32, 16, SPLIT_K=min(2, max(1, triton.cdiv(K4, 16))))
    return _Config("gemm", 32, 32, 16, GROUP_M=2)


def _candidates(M: int, N: int, K4: int, device: torch.device) -> list[_Config]:
    """The configurations worth timing for this problem (exactly one under the interpreter)."""
    return gpu_or_interpreter(_gpu_candidates(M, N, K4, device), [_interpreter_candidate(M, K4)])


def _launch(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, cfg: _Config) -> torch.Tensor:
    """Run one configuration on x2 (M, K) with a unit last stride; returns (M, N) in x2.dtype."""
    M, K = x2.shape
    N, K4 = packed.shape[0], K // 4
    out = empty_output((M, N), x2.dtype, x2.device)
    # codes are exact in bf16/fp16, so the weight operand takes x's dtype
    common = dict(BM=cfg.BM, BN=cfg.BN, BQ=cfg.BQ, ALIGN=pow2_divisor(K4), MASK_K=K4 % cfg.BQ != 0,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_args(x2.dtype))
    if cfg.path == "decode":
        part = out if cfg.SPLIT_K == 1 else empty_output((cfg.SPLIT_K, M, N), torch.float32, x2.device)
        _int6_decode_kernel[(triton.cdiv(N, cfg.BN), cfg.SPLIT_K)](
            x2, packed, scales, out, part, M, N, K4, x2.stride(0), SPLIT_K=cfg.SPLIT_K, **common)
        if cfg.SPLIT_K > 1:
            _splitk_reduce_kernel[(triton.cdiv(M * N, _REDUCE_BLOCK),)](
                part, scales, out, M * N, N, SPLIT_K=cfg.SPLIT_K, BLOCK=_REDUCE_BLOCK)
    else:
        grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
        _int6_gemm_kernel[grid](x2, packed, scales, out, M, N, K4, x2.stride(0),
                                GROUP_M=cfg.GROUP_M, W_FIRST=cfg.W_FIRST, **common)
    return out


_CHOICES = PersistentChoices("int6_linear")


def _pick_config(x2: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> _Config:
    """The fastest candidate, timed once per (path, M or its power-of-two bucket, N, K, dtypes, device name)
    and remembered across processes. Timing runs the whole op (split-K reduction included); it
    synchronises, so warm a shape up before capturing it in a CUDA graph."""
    M, K = x2.shape
    N = packed.shape[0]
    cands = _candidates(M, N, K // 4, x2.device)
    if len(cands) == 1:
        return cands[0]
    m_key = M if M <= DECODE_MAX_M else triton.next_power_of_2(M)
    key = f"M{m_key}-N{N}-K{K}-{x2.dtype}-{scales.dtype}".replace("torch.", "")
    return _CHOICES.pick(key, torch.cuda.get_device_name(x2.device), cands,
                         lambda c: do_bench(lambda: _launch(x2, packed, scales, c), warmup=5, rep=20,
                                            return_mode="median"))


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("crawler_kernels::int6_linear", mutates_args=())
def _int6_linear_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    K, N = x.shape[-1], packed.shape[0]
    if x.numel() == 0 or N == 0:     # nothing to launch; an empty K sums to zero
        return x.new_zeros(*x.shape[:-1], N)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    scales = scales.contiguous()
    out = _launch(x2, packed, scales, _pick_config(x2, packed, scales))
    return out.reshape(*x.shape[:-1], N)


@_int6_linear_op.register_fake
def _(x, packed, scales):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def int6_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y = x @ (codes * scales[:, None]).T computed from packed int6 codes (layout: module docstring).

    x (..., K) float32/float16/bfloat16, K % 4 == 0; packed (N, 3K/4) uint8 from `pack_int6`, contiguous;
    scales (N,) float16/float32; all on one device (CPU runs under TRITON_INTERPRET=1). Returns (..., N)
    in x.dtype, accumulated in fp32. Inference only (no autograd). Registered as
    crawler_kernels::int6_linear, so torch.compile(fullgraph=True) traces through it.
    """
    check_int6_linear_inputs(x, packed, scales)
    check_triton_device("int6_linear", "x", x)
    return _int6_linear_op(x, packed, scales)
