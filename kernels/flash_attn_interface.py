"""FlashAttention-3's Python entry points on `kernels.attention`, so moving a training script off FA3 is an
import change: `from kernels.flash_attn_interface import flash_attn_func, flash_attn_varlen_func`.

The two functions take FA3's arguments (the hopper `flash_attn_interface`) by the same names, positions and
defaults, the same layouts and return the same things:
  * `flash_attn_func`: q (B, Tq, H, D), k/v (B, Tk, Hkv, D), H % Hkv == 0 (GQA: query head h reads KV head
    h // (H / Hkv)), causal masking aligned bottom-right. Unlike FA3, Tq <= Tk (queries after a KV cache);
    Tq > Tk (rows that see no key) is refused.
  * `flash_attn_varlen_func`: packed q (total, H, D), k/v (total, Hkv, D) (or the same with a leading 1,
    the (1, total, H, D) view the varlen records keep), int32 cu_seqlens with repeated ends allowed
    (empty segments, for a fixed-capacity batch), causal within each segment. Queries and keys are the
    same packed rows: cu_seqlens_q must be cu_seqlens_k (the same tensor, or equal values: checked on the
    device, no host sync). max_seqlen_q / max_seqlen_k size the grid (any value is correct, the longest
    segment is fastest).
  * softmax_scale defaults to 1/sqrt(D); dtypes float16, bfloat16 and also float32 (FP8 is refused).
  * Returns out (q's shape and dtype); with return_attn_probs=True, (out, softmax_lse): the float32
    log-sum-exp of each row's scaled scores, (B, H, Tq) dense and (H, total) varlen ((1, H, total) for
    a 4-D q), not differentiable, as FA3's.
Ours on top, keyword-only: `xsa=True` applies Exclusive Self Attention inside the kernel (what the records
do right after FA3: y − (y·v̂)v̂ with v̂ = F.normalize(v) of the query's own KV head), and `q_gain` (H,)
multiplies head h's scores by q_gain[h] inside the kernel (the records' `q * q_gain` before FA3, without
the pass over q), differentiable.

Every FA3 argument these functions do not serve raises ValueError naming it when given anything but its
default: qv, q_descale/k_descale/v_descale (FP8), window_size other than (-1, -1) (local attention),
attention_chunk, softcap, seqused_q/seqused_k, num_splits other than 1, pack_gqa other than None,
sm_margin other than 0. `deterministic` is accepted either way: the backward is always deterministic
(no float atomics). The backward is `kernels.attention`'s (docs/ops.md).
"""
from __future__ import annotations

import torch

from .attention import attention

# FA3 arguments without an implementation here: name -> (the only value served, what FA3 does with it).
UNSERVED = {
    "qv": (None, "the extra query projection of multi-head latent attention"),
    "q_descale": (None, "FP8 descaling"),
    "k_descale": (None, "FP8 descaling"),
    "v_descale": (None, "FP8 descaling"),
    "window_size": ((-1, -1), "sliding-window (local) attention"),
    "attention_chunk": (0, "chunked attention"),
    "softcap": (0.0, "score softcapping"),
    "seqused_q": (None, "per-sequence used lengths"),
    "seqused_k": (None, "per-sequence used lengths"),
    "num_splits": (1, "split-KV scheduling"),
    "pack_gqa": (None, "GQA packing choice"),
    "sm_margin": (0, "leaving SMs free"),
}


def _is_served(value, served) -> bool:
    if served is None:
        return value is None
    if isinstance(served, tuple):
        return isinstance(value, (tuple, list)) and tuple(value) == served
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == served


def _refuse_unserved(fn: str, given: dict) -> None:
    """ValueError naming the first FA3 argument in `given` set to anything but the value served."""
    for name, value in given.items():
        served, what = UNSERVED[name]
        if not _is_served(value, served):
            raise ValueError(f"{fn}: {name}={value!r} is not supported by kernels.flash_attn_interface "
                             f"(FA3's {what}); only {name}={served!r} is")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                    pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, *, xsa=False,
                    q_gain=None):
    """FA3's `flash_attn_func` (module docstring): q (B, Tq, H, D), k/v (B, Tk, Hkv, D), Tq <= Tk ->
    out (B, Tq, H, D) in q.dtype, or (out, softmax_lse (B, H, Tq) float32) with return_attn_probs."""
    _refuse_unserved("flash_attn_func", dict(
        qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, window_size=window_size,
        attention_chunk=attention_chunk, softcap=softcap, num_splits=num_splits, pack_gqa=pack_gqa,
        sm_margin=sm_margin))
    return attention(q, k, v, causal=causal, xsa=xsa, softmax_scale=softmax_scale, q_gain=q_gain,
                     return_lse=bool(return_attn_probs))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                           k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                           num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False,
                           *, xsa=False, q_gain=None):
    """FA3's `flash_attn_varlen_func` (module docstring): packed q (total, H, D), k/v (total, Hkv, D) (or
    (1, total, ·, D)), cu_seqlens_q = cu_seqlens_k int32 (num_docs + 1,) -> out of q's shape in q.dtype,
    or (out, softmax_lse (H, total) float32) with return_attn_probs."""
    _refuse_unserved("flash_attn_varlen_func", dict(
        seqused_q=seqused_q, seqused_k=seqused_k, qv=qv, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, window_size=window_size, attention_chunk=attention_chunk, softcap=softcap,
        num_splits=num_splits, pack_gqa=pack_gqa, sm_margin=sm_margin))
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("flash_attn_varlen_func: cu_seqlens_q and cu_seqlens_k are required")
    if cu_seqlens_k is not cu_seqlens_q:
        if not isinstance(cu_seqlens_k, torch.Tensor) or cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(f"cu_seqlens_k: expected the same offsets as cu_seqlens_q (queries and keys are the "
                             f"same packed rows), got shape {tuple(getattr(cu_seqlens_k, 'shape', ()))} vs "
                             f"{tuple(cu_seqlens_q.shape)}")
        same = "cu_seqlens_k: expected the same offsets as cu_seqlens_q (queries and keys are the same packed rows)"
        if cu_seqlens_q.device.type == "cuda" or torch.compiler.is_compiling():
            # Checked on the device: a mismatch stops the process at the next sync, none is forced here.
            torch._assert_async((cu_seqlens_q == cu_seqlens_k).all(), same)
        elif not torch.equal(cu_seqlens_q, cu_seqlens_k):
            raise ValueError(same)
    bounds = [m for m in (max_seqlen_q, max_seqlen_k) if m is not None]
    return attention(q, k, v, causal=causal, xsa=xsa, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens_q,
                     max_seqlen=max(bounds) if bounds else None, q_gain=q_gain,
                     return_lse=bool(return_attn_probs))
