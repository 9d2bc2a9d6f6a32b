"""nn.Module wrappers of the ops, for use in any model and training script (docs/ops.md has an example).

Each module owns the parameters (or packed buffers) of its op and calls it in `forward`. `ops` picks
the implementation: "triton" (the fused kernels exported by `kernels`; CUDA, or the CPU under
TRITON_INTERPRET=1) or "reference" (the plain-PyTorch `kernels.reference`, which runs anywhere and in
float64). There is no "auto": which one a device gets is the caller's decision, made once in its code.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# The package itself, for its Triton ops: the modules look them up when called (this file is imported
# while kernels/__init__.py runs, before those names exist).
import kernels

from . import reference
from .utils import FLOAT_DTYPES, check_tensor

OPS = ("triton", "reference")
# The crawler's initialisation (docs/math.md §1.10) of the embedding tables: N(0, std²).
TOK_EMB_STD = 0.005
BIGRAM_TABLE_STD = 0.01


def _check_ops(ops: str) -> str:
    if ops not in OPS:
        raise ValueError(f"ops: expected one of {OPS}, got {ops!r}")
    return ops


def select_op(ops, name: str):
    """The implementation of op `name` for an ops kind: "triton" (kernels.<name>), "reference"
    (kernels.reference.<name>), or any object whose attributes are the ops (e.g. a baseline set built on
    SDPA). The one place this mapping lives: crawler's model and inference call it too."""
    if not isinstance(ops, str):
        return getattr(ops, name)
    if ops == "reference":
        return getattr(reference, name)
    fn = getattr(kernels, name, None)
    if fn is None:
        raise NotImplementedError(f"ops='triton': op {name!r} has no Triton kernel in this version; "
                                  f"use ops='reference'")
    return fn


class Attention(nn.Module):
    """Causal (or full) softmax attention with grouped KV heads, optional XSA, dense or varlen: the
    `kernels.attention` op as a module (no parameters).

    forward(q, k, v, *, cu_seqlens=None, max_seqlen=None): dense q (B, Tq, H, D), k/v (B, Tk, Hkv, D)
    with Tq <= Tk (the queries are the last Tq positions, as after a KV cache); varlen q (total, H, D),
    k/v (total, Hkv, D) with cu_seqlens int32 (num_docs + 1,) (each segment attends to itself only).
    H % Hkv == 0, D even <= 128, float32/float16/bfloat16 (float64 with ops="reference"). Returns q's
    shape and dtype; differentiable in q, k, v.
    """

    def __init__(self, *, causal: bool = True, xsa: bool = False, softmax_scale: float | None = None,
                 ops: str = "triton"):
        super().__init__()
        self.causal, self.xsa, self.softmax_scale, self.ops = causal, xsa, softmax_scale, _check_ops(ops)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, xsa={self.xsa}, softmax_scale={self.softmax_scale}, ops={self.ops}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        return select_op(self.ops, "attention")(q, k, v, causal=self.causal, xsa=self.xsa,
                                          softmax_scale=self.softmax_scale, cu_seqlens=cu_seqlens,
                                          max_seqlen=max_seqlen)


class XSAAttention(Attention):
    """`Attention` with Exclusive Self Attention: each head's output is projected off its own normalised
    value, z = y − (y·v̂) v̂ (docs/math.md §1.9). Same forward contract as `Attention`."""

    def __init__(self, *, causal: bool = True, softmax_scale: float | None = None, ops: str = "triton"):
        super().__init__(causal=causal, xsa=True, softmax_scale=softmax_scale, ops=ops)


class FusedEmbedding(nn.Module):
    """Token embedding + BigramHash + rms_norm + SmearGate in one op (`kernels.embed`, docs/math.md
    §1.5-1.6), owning its parameters with the crawler's initialisation (docs/math.md §1.10):
    tok_emb (V, d) ~ N(0, 0.005²), bigram_table (buckets, k) ~ N(0, 0.01²), bigram_proj (d, k) = 0,
    smear_gate (d,) = 0 (σ = 0.5). With `bos_id`, positions holding it start a document (nothing of the
    previous document reaches them).

    forward(ids (B, T) int in [0, V)) -> x0 (B, T, d) in tok_emb's dtype; differentiable in all four
    parameters. `dtype` applies to every parameter (the crawler keeps the tables in bf16, proj and gate in
    fp32: cast them after construction for that).
    """

    def __init__(self, vocab_size: int, model_dim: int, bigram_buckets: int, bigram_dim: int, *,
                 bos_id: int | None = None, ops: str = "triton", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.bos_id, self.ops = bos_id, _check_ops(ops)
        self.tok_emb = nn.Parameter(torch.empty(vocab_size, model_dim, **factory))
        self.bigram_table = nn.Parameter(torch.empty(bigram_buckets, bigram_dim, **factory))
        self.bigram_proj = nn.Parameter(torch.empty(model_dim, bigram_dim, **factory))
        self.smear_gate = nn.Parameter(torch.empty(model_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb, std=TOK_EMB_STD)
        nn.init.normal_(self.bigram_table, std=BIGRAM_TABLE_STD)
        nn.init.zeros_(self.bigram_proj)
        nn.init.zeros_(self.smear_gate)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.tok_emb.shape[0]}, model_dim={self.tok_emb.shape[1]}, "
                f"bigram={tuple(self.bigram_table.shape)}, bos_id={self.bos_id}, ops={self.ops}")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return select_op(self.ops, "embed")(ids, self.tok_emb, self.bigram_table, self.bigram_proj, self.smear_gate,
                                      bos_id=self.bos_id)


class ReLU2MLP(nn.Module):
    """mlp(h) = relu(h @ fc_weight.T)² @ proj_weight.T (or leaky_relu(·, negative_slope)²), fused
    (`kernels.relu2_mlp`). fc_weight (hidden, dim) orthogonal, proj_weight (dim, hidden) zero (the
    crawler's initialisation, docs/math.md §1.10: a residual branch starts as the identity).

    forward(h (..., dim) float) -> (..., dim) in h's dtype; differentiable in h and both weights (cast
    to h's dtype at the matmul).
    """

    def __init__(self, dim: int, hidden: int, *, negative_slope: float = 0.0, ops: str = "triton",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.negative_slope, self.ops = negative_slope, _check_ops(ops)
        self.fc_weight = nn.Parameter(torch.empty(hidden, dim, **factory))
        self.proj_weight = nn.Parameter(torch.empty(dim, hidden, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.fc_weight)
        nn.init.zeros_(self.proj_weight)

    def extra_repr(self) -> str:
        return (f"dim={self.fc_weight.shape[1]}, hidden={self.fc_weight.shape[0]}, "
                f"negative_slope={self.negative_slope}, ops={self.ops}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return select_op(self.ops, "relu2_mlp")(h, self.fc_weight, self.proj_weight, self.negative_slope)


class SoftcappedCrossEntropyLoss(nn.Module):
    """Cross-entropy of a softcapped (tied) head, softcap·tanh(hidden @ weight.T / softcap), with the
    logits never materialised (`kernels.softcapped_cross_entropy`). No parameters: the head's weight
    (usually the token embedding) is passed in. reduction "mean" | "sum" | "none" and ignore_index as
    F.cross_entropy.

    forward(hidden (..., d) float, weight (V, d) float, targets (...) int in [0, V) or ignore_index) ->
    0-d ("mean" over the targets not ignored, "sum") or the per-position losses of targets' shape
    ("none", 0 where ignored); float32 (float64 for float64 hidden); differentiable in hidden and weight.
    """

    def __init__(self, softcap: float = 30.0, *, reduction: str = "mean", ignore_index: int = -100,
                 ops: str = "triton"):
        super().__init__()
        self.softcap, self.reduction, self.ignore_index = softcap, reduction, ignore_index
        self.ops = _check_ops(ops)

    def extra_repr(self) -> str:
        return (f"softcap={self.softcap}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"ops={self.ops}")

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if hidden.dim() < 1 or hidden.shape[:-1] != targets.shape:
            raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden's without the "
                             f"last dim), got {tuple(targets.shape)}")
        loss = select_op(self.ops, "softcapped_cross_entropy")(
            hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), self.softcap,
            reduction=self.reduction, ignore_index=self.ignore_index)
        return loss.reshape(targets.shape) if self.reduction == "none" else loss


class Int6Linear(nn.Module):
    """A Linear on int6 weights, held packed only: buffers `packed` uint8 (out, 3·in/4) (the
    `kernels.pack_int6` layout), `scales` fp16 (out,) and, if any, `bias` (out,). W ≈ codes · scales[:, None]
    is never dequantised whole. Build it with `from_linear` (quantise a float nn.Linear) or `from_codes`.

    forward(x (..., in) float32/float16/bfloat16) -> (..., out) in x's dtype (`kernels.int6_linear`;
    inference only: no gradient).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, ops: str = "triton",
                 device=None):
        super().__init__()
        if in_features % 4 != 0:
            raise ValueError(f"in_features: int6 packs 4 codes in 3 bytes, expected a multiple of 4, "
                             f"got {in_features}")
        self.in_features, self.out_features, self.ops = in_features, out_features, _check_ops(ops)
        self.register_buffer("packed", torch.zeros(out_features, 3 * in_features // 4, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                   ops: str = "triton") -> Int6Linear:
        """codes int8 (out, in) in [-32, 31] with in % 4 == 0, scales (out,) float (stored fp16), bias
        (out,) float or None; on one device."""
        packed = kernels.pack_int6(codes)
        out_features, in_features = codes.shape
        check_tensor("scales", scales, ndim=1, dtypes=FLOAT_DTYPES, device=codes.device)
        if scales.shape[0] != out_features:
            raise ValueError(f"scales: expected shape ({out_features},) (one per row of codes), "
                             f"got {tuple(scales.shape)}")
        if bias is not None:
            check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=codes.device)
            if bias.shape[0] != out_features:
                raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
        module = cls(in_features, out_features, bias=bias is not None, ops=ops, device=codes.device)
        module.packed.copy_(packed)
        module.scales.copy_(scales)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, hessian: torch.Tensor | None = None, clip_sigmas: float = 12.85,
                    ops: str = "triton") -> Int6Linear:
        """Quantise `linear`'s weight (out, in) to int6 with SDClip row scales (docs/math.md §3): GPTQ
        against `hessian` (in, in) = XᵀX/n of the layer's inputs when given (the better choice), else
        round-to-nearest. The bias, if any, is kept in float32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if hessian is None:
            scales = reference.sdclip_scales(weight, 6, clip_sigmas)
            codes = reference.quantize_rtn(weight, scales, 6)
        else:
            codes, scales = select_op(ops, "gptq_quantize")(weight, hessian, bits=6, clip_sigmas=clip_sigmas)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls.from_codes(codes, scales, bias, ops=ops)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, ops={self.ops}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = select_op(self.ops, "int6_linear")(x, self.packed, self.scales)
        return y if self.bias is None else y + self.bias.to(y.dtype)


__all__ = ["OPS", "select_op", "Attention", "XSAAttention", "FusedEmbedding", "ReLU2MLP", "SoftcappedCrossEntropyLoss",
           "Int6Linear"]
