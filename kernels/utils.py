"""Shared plumbing for the ops: input validation with clear errors, output allocation (NaN-poisoned
under test so an element a kernel forgets to write fails the comparison), interpreter detection."""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate a kernel output. With KERNELS_POISON_OUTPUTS=1 (set by the test suite) floating outputs
    are filled with NaN and integer outputs with their minimum value, so unwritten elements show up."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("KERNELS_POISON_OUTPUTS", "0") == "1":
        if dtype.is_floating_point:
            out.fill_(math.nan)
        elif dtype != torch.bool:
            out.fill_(torch.iinfo(dtype).min)
    return out


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
                 contiguous: bool = False) -> None:
    """Raise TypeError/ValueError naming `name` unless `t` is a tensor with the expected rank, dtype,
    device and (optionally) contiguity."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")


def check_attention_inputs(q, k, v, *, softmax_scale=None, cu_seqlens=None, max_seqlen=None) -> int | None:
    """Validate the `attention` contract (docs/ops.md).

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) with Tq <= Tk. Varlen (cu_seqlens given): q (total, H, D)
    or (1, total, H, D), k/v of q's rank with total rows and Hkv heads; cu_seqlens int32 (num_docs + 1,)
    on q's device with 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total; max_seqlen None or an int >= 1
    (varlen only). Always: H % Hkv == 0, D even and <= 128, one float dtype, softmax_scale None or a
    finite number > 0. Returns the longest segment when it read cu_seqlens' values (one host sync), else
    None: the values are not checked while torch.compile traces, where reading them would break the graph.
    """
    varlen = cu_seqlens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=None if varlen else 4, dtypes=FLOAT_DTYPES,
                     device=q.device if name != "q" else None)
    if k.shape != v.shape:
        raise ValueError(f"k and v: expected equal shapes, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    H, D = q.shape[-2:]
    if varlen:
        if q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[0] != 1):
            raise ValueError(f"q: with cu_seqlens, expected packed rows (total, H, D) or (1, total, H, D), "
                             f"got shape {tuple(q.shape)}")
        if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != D:
            raise ValueError(f"k: expected shape ({', '.join(map(str, q.shape[:-2]))}, Hkv, {D}) to match q "
                             f"{tuple(q.shape)} (one packed row per query row), got {tuple(k.shape)}")
    else:
        B, Tq = q.shape[:2]
        if k.shape[0] != B or k.shape[1] < Tq or k.shape[3] != D:
            raise ValueError(f"k: expected shape ({B}, Tk, Hkv, {D}) with Tk >= {Tq} to match q {tuple(q.shape)} "
                             f"(Tk > Tq: the queries are the last Tq positions), got {tuple(k.shape)}")
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful with cu_seqlens (varlen attention)")
    if H % k.shape[-2] != 0:
        raise ValueError(f"q/k: number of query heads {H} must be a multiple of KV heads {k.shape[-2]}")
    if D % 2 != 0 or D > 128:
        raise ValueError(f"q: head dim must be even and <= 128, got {D}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and not
                                          isinstance(softmax_scale, bool) and 0 < softmax_scale < math.inf):
        raise ValueError(f"softmax_scale: expected a finite positive number, got {softmax_scale!r}")
    if not varlen:
        return None
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected num_docs + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
                                   or max_seqlen < 1):
        raise ValueError(f"max_seqlen: expected an int >= 1 (the longest segment), got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return None
    bounds = cu_seqlens.tolist()
    total = q.shape[-3]
    if min(bounds) < 0:
        raise ValueError(f"cu_seqlens: expected non-negative offsets, got {min(bounds)}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {bounds[0]}")
    steps = [b - a for a, b in zip(bounds, bounds[1:])]
    if min(steps) < 0:
        i = steps.index(min(steps))
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {bounds[i]} then {bounds[i + 1]} "
                         f"at index {i}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens: expected to end at the number of packed rows {total}, got {bounds[-1]}")
    return max(steps)


def check_embed_inputs(ids, tok_emb, bigram_table, bigram_proj, smear_gate, *, bos_id=None) -> None:
    """Validate the `embed` contract: ids (B,T) int, tok_emb (V,d), bigram_table (NB,k), bigram_proj
    (d,k), smear_gate (d,), all on one device; bos_id None or an int id in [0, V)."""
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int32, torch.int64, torch.int16, torch.uint16))
    dev = ids.device
    check_tensor("tok_emb", tok_emb, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("bigram_table", bigram_table, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("bigram_proj", bigram_proj, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    check_tensor("smear_gate", smear_gate, ndim=1, dtypes=FLOAT_DTYPES, device=dev)
    d = tok_emb.shape[1]
    if bigram_proj.shape != (d, bigram_table.shape[1]):
        raise ValueError(f"bigram_proj: expected shape ({d}, {bigram_table.shape[1]}) "
                         f"(model dim, bigram dim), got {tuple(bigram_proj.shape)}")
    if smear_gate.shape != (d,):
        raise ValueError(f"smear_gate: expected shape ({d},), got {tuple(smear_gate.shape)}")
    if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int)
                               or not 0 <= bos_id < tok_emb.shape[0]):
        raise ValueError(f"bos_id: expected None or a token id in [0, {tok_emb.shape[0]}), got {bos_id!r}")
    # The id range is a data-dependent check (a host sync): skipped while torch.compile traces, where it
    # would break the graph. uint16 has no min/max kernels, hence the widening.
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in (ids.int() if ids.dtype == torch.uint16 else ids).aminmax())
        if lo < 0 or hi >= tok_emb.shape[0]:
            raise ValueError(f"ids: expected token ids in [0, {tok_emb.shape[0]}), got range [{lo}, {hi}]")


def check_gptq_args(bits, clip_sigmas, block_size=None, damp=None) -> None:
    """Validate GPTQ / SDClip settings: bits an int in 2..8 (codes live in int8), clip_sigmas > 0,
    block_size an int > 0, damp >= 0 (each only when given)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an int in 2..8, got {bits!r}")
    if not (isinstance(clip_sigmas, (int, float)) and math.isfinite(clip_sigmas) and clip_sigmas > 0):
        raise ValueError(f"clip_sigmas: expected a finite number > 0, got {clip_sigmas!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size <= 0):
        raise ValueError(f"block_size: expected an int > 0, got {block_size!r}")
    if damp is not None and not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp: expected a finite number >= 0, got {damp!r}")


def check_gptq_inputs(weight, hessian, *, batched: bool = False) -> None:
    """Validate GPTQ input shapes and dtypes: weight (N, K) and hessian (K, K) (with a leading matrix dim
    M when `batched`), floating, on one device, K >= 2 (the row std needs two values). Reads no values
    (see `check_gptq_values`), so it also runs on the fake tensors of torch.compile."""
    lead = 1 if batched else 0
    check_tensor("weight", weight, ndim=2 + lead, dtypes=FLOAT_DTYPES)
    check_tensor("hessian", hessian, ndim=2 + lead, dtypes=FLOAT_DTYPES, device=weight.device)
    K = weight.shape[-1]
    expected = (*weight.shape[:lead], K, K)
    if tuple(hessian.shape) != expected:
        raise ValueError(f"hessian: expected shape {expected} (K = weight.shape[-1] = {K}), "
                         f"got {tuple(hessian.shape)}")
    if K < 2 or weight.shape[-2] < 1:
        raise ValueError(f"weight: expected at least 1 row and 2 columns, got shape {tuple(weight.shape)}")


def check_gptq_values(weight, hessian) -> None:
    """Validate GPTQ input values: both finite, diag(H) >= 0 (H = XᵀX/n is positive semi-definite)."""
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
    if bool((hessian.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError("hessian: diagonal entries must be >= 0 (H = XᵀX/n is positive semi-definite)")


# ----------------------------------------------------------------------------------------------
# Shared Triton pieces for the "matmul with a fused epilogue" kernels (cross_entropy, mlp)
# ----------------------------------------------------------------------------------------------

def tile_matmul_flags(dtype: torch.dtype, device) -> dict:
    """The UPCAST and PRECISION arguments of `tile_matmul` for operands of `dtype` on `device`.

    UPCAST: under the interpreter (no bf16 dot) and for fp64 inputs (computed in fp32 tiles).
    PRECISION mirrors torch's own matmul setting: fp32 operands on a GPU use TF32 only where torch would
    (`torch.get_float32_matmul_precision()` is not "highest"), so an op is as exact as the matmul it
    replaces. 16-bit operands ignore it; they get Triton's default ("tf32").
    """
    full_fp32 = dtype in (torch.float32, torch.float64) and (
        torch.device(device).type != "cuda" or torch.get_float32_matmul_precision() == "highest")
    return {"UPCAST": interpreting() or dtype == torch.float64, "PRECISION": "ieee" if full_fp32 else "tf32"}


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id onto a (row tile, column tile) pair, GROUP_M row tiles at a time, so the
    programs running together share their column operand tiles in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_n = (pid % group) // group_size
    return pid_m, pid_n


@triton.jit
def tile_matmul(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, rows, cols, K,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile A[rows, :] @ B[:, cols] of shape (BLOCK_M, BLOCK_N), looping over K in BLOCK_K steps.

    `rows`/`cols` must be valid indices (callers wrap out-of-range ones with `% M`, so the loads need a
    mask only along K; their results are dropped at the store). Row and column offsets are widened to
    int64 so operands with more than 2**31 elements address correctly. UPCAST turns the
    operands to fp32 before tl.dot (the interpreter has no bf16 dot; fp64 inputs are computed in fp32).
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def check_int6_linear_inputs(x, packed, scales, *, allow_float64: bool = False) -> None:
    """Validate the `int6_linear` contract: x (..., K) float with K % 4 == 0; packed uint8 (N, 3K/4),
    contiguous (its bytes are addressed directly); scales (N,) float16/float32; all on x's device.
    `allow_float64` admits float64 x and scales (the reference, evaluated in float64 by the tests)."""
    x_dtypes = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if allow_float64 else ())
    s_dtypes = (torch.float16, torch.float32) + ((torch.float64,) if allow_float64 else ())
    check_tensor("x", x, dtypes=x_dtypes)
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of shape (..., K), got a 0-d tensor")
    check_tensor("packed", packed, ndim=2, dtypes=(torch.uint8,), device=x.device, contiguous=True)
    check_tensor("scales", scales, ndim=1, dtypes=s_dtypes, device=x.device)
    K = x.shape[-1]
    if K % 4 != 0:
        raise ValueError(f"x: last dim K must be a multiple of 4 (int6 packs 4 codes in 3 bytes), got {K}")
    N = packed.shape[0]
    if packed.shape[1] != 3 * K // 4:
        raise ValueError(f"packed: expected shape (N, {3 * K // 4}) = (N, 3K/4) for x's K = {K}, "
                         f"got {tuple(packed.shape)}")
    if scales.shape[0] != N:
        raise ValueError(f"scales: expected shape ({N},) (one scale per packed row), "
                         f"got {tuple(scales.shape)}")
