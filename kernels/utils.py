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
