"""The ways people run these ops today, which our kernels are measured against (one definition each).

- `xsa_gqa`: XSA as torch ops in the parameter-golf records' GQA-aware form (no expanded v), the
  formulation they compile after SDPA / FlashAttention (docs/math.md §1.9).
- `sdpa_attention`: PyTorch SDPA with one backend pinned (flash, cuDNN, mem-efficient, math), native
  GQA or expanded k/v, an optional boolean mask, then XSA. Head dims the fused backends reject (46 is
  not a multiple of 8) are zero-padded to the next multiple of 8 inside the call, the scale kept at
  1/sqrt(D), as a user of SDPA at this shape has to.
- `flex_attention_xsa`: compiled FlexAttention with a block mask, then XSA.
- `fa3_varlen_attention`: FlashAttention-3's `flash_attn_varlen_func` (when `flash_attn_interface`
  imports), then XSA.
- `SEED_OPS`: the op set of the seed's training script for `CrawlerGPT(config, ops=SEED_OPS)`: SDPA
  flash + XSA in torch, and the plain-PyTorch embedding, MLP and cross-entropy of kernels.reference
  (the step-time benchmark compiles the whole model, as the seed does).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

import kernels
from bench import harness
from kernels.attention import padded_head_dim


def xsa_gqa(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA z = y - (y·v̂)v̂ on y (B, T, H, D) with v (B, T, Hkv, D), query head h using KV head h // (H/Hkv),
    computed in float32 without expanding v. Returns (B, T, H, D) in y.dtype."""
    B, T, H, D = y.shape
    Hkv = v.shape[2]
    yg = y.reshape(B, T, Hkv, H // Hkv, D).float()
    v_hat = F.normalize(v.float(), dim=-1, eps=1e-12).unsqueeze(3)
    return (yg - (yg * v_hat).sum(-1, keepdim=True) * v_hat).to(y.dtype).reshape(B, T, H, D)


@functools.cache
def compiled_xsa():
    """`xsa_gqa` under torch.compile(fullgraph=True): how the records run XSA beside a fused attention."""
    return harness.compiled(xsa_gqa, fullgraph=True)


def _pad(t: torch.Tensor) -> torch.Tensor:
    """t (..., D) zero-padded to padded_head_dim(D) columns (a multiple of 8: what the fused SDPA / FA3
    backends accept)."""
    pad = padded_head_dim(t.shape[-1]) - t.shape[-1]
    return F.pad(t, (0, pad)) if pad else t


def sdpa_attention(q, k, v, *, backend, causal: bool = True, xsa: bool = False, softmax_scale: float | None = None,
                   attn_mask: torch.Tensor | None = None, expand_kv: bool = False, xsa_fn=xsa_gqa) -> torch.Tensor:
    """SDPA on (B, T, H, D) q and (B, T, Hkv, D) k/v with `backend` (a torch.nn.attention.SDPBackend) pinned.

    attn_mask: optional (B, 1, T, T) bool, True = may attend (then `causal` must be folded into it);
    expand_kv: repeat k/v to H heads instead of SDPA's native GQA (for backends without it).
    Returns (B, T, H, D) in q.dtype, XSA'd by `xsa_fn` when `xsa`."""
    from torch.nn.attention import sdpa_kernel
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qt, kt, vt = (_pad(t).transpose(1, 2) for t in (q, k, v))
    if expand_kv:
        G = q.shape[2] // k.shape[2]
        kt, vt = kt.repeat_interleave(G, dim=1), vt.repeat_interleave(G, dim=1)
    with sdpa_kernel(backend):
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, is_causal=causal and attn_mask is None,
                                           scale=scale, enable_gqa=not expand_kv)
    y = y.transpose(1, 2)[..., :D]
    return xsa_fn(y, v) if xsa else y


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once (its fused kernel exists only under torch.compile)."""
    from torch.nn.attention.flex_attention import flex_attention
    return harness.compiled(flex_attention, fullgraph=True)


def flex_attention_xsa(q, k, v, block_mask, *, xsa: bool = True) -> torch.Tensor:
    """Compiled FlexAttention on (B, T, H, D) q, (B, T, Hkv, D) k/v with `block_mask` (native GQA, scale
    1/sqrt(D)), then compiled XSA. Returns (B, T, H, D)."""
    y = compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                                  scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=True).transpose(1, 2)
    return compiled_xsa()(y, v) if xsa else y


def fa3_varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, xsa: bool = True) -> torch.Tensor:
    """FlashAttention-3 varlen, causal, on packed (total, H, D) q and (total, Hkv, D) k/v (head dim padded
    to a multiple of 8), then compiled XSA. Raises ImportError without `flash_attn_interface`."""
    from flash_attn_interface import flash_attn_varlen_func
    D = q.shape[-1]
    out = flash_attn_varlen_func(_pad(q), _pad(k), _pad(v), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                 softmax_scale=1.0 / math.sqrt(D), causal=True)
    y = (out[0] if isinstance(out, tuple) else out)[..., :D]   # some FA3 versions also return the LSE
    return compiled_xsa()(y[None], v[None])[0] if xsa else y


def seed_attention(q, k, v, *, causal: bool = True, xsa: bool = False, softmax_scale: float | None = None):
    """The seed's attention: SDPA flash (native GQA, head dim padded to 48), XSA as torch ops."""
    from torch.nn.attention import SDPBackend
    return sdpa_attention(q, k, v, backend=SDPBackend.FLASH_ATTENTION, causal=causal, xsa=xsa,
                          softmax_scale=softmax_scale)


class SeedOps:
    """The seed's op set as an ops object for CrawlerGPT. A plain class, not a SimpleNamespace: the model
    compares its ops with "auto", and torch.compile(fullgraph=True) cannot trace SimpleNamespace's C
    comparison (a graph break, seen with torch 2.13)."""
    attention = staticmethod(seed_attention)
    embed = staticmethod(kernels.reference.embed)
    relu2_mlp = staticmethod(kernels.reference.relu2_mlp)
    softcapped_cross_entropy = staticmethod(kernels.reference.softcapped_cross_entropy)


SEED_OPS = SeedOps()
