"""Shared plumbing for the ops: input validation with clear errors, output allocation (NaN-poisoned
under test so an element a kernel forgets to write fails the comparison), interpreter detection."""
from __future__ import annotations

import math
import os

import torch

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


def check_attention_inputs(q, k, v) -> None:
    """Validate the `attention` contract: q (B,T,H,D), k/v (B,T,Hkv,D), H % Hkv == 0, D even <= 128."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=FLOAT_DTYPES, device=q.device if name != "q" else None)
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v: expected equal shapes, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k: expected shape ({B}, {T}, Hkv, {D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if H % k.shape[2] != 0:
        raise ValueError(f"q/k: number of query heads {H} must be a multiple of KV heads {k.shape[2]}")
    if D % 2 != 0 or D > 128:
        raise ValueError(f"q: head dim must be even and <= 128, got {D}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_embed_inputs(ids, tok_emb, bigram_table, bigram_proj, smear_gate) -> None:
    """Validate the `embed` contract: ids (B,T) int, tok_emb (V,d), bigram_table (NB,k), bigram_proj
    (d,k), smear_gate (d,), all on one device."""
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
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= tok_emb.shape[0]):
        raise ValueError(f"ids: expected token ids in [0, {tok_emb.shape[0]}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")


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
    """Validate GPTQ inputs: weight (N, K) and hessian (K, K) (with a leading matrix dim M when
    `batched`), floating, on one device, finite, K >= 2 (the row std needs two values), diag(H) >= 0."""
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
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
    if bool((hessian.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError("hessian: diagonal entries must be >= 0 (H = XᵀX/n is positive semi-definite)")
