"""Fused Triton ops for crawler transformers. Each public op here has an identically named plain-PyTorch
reference in `kernels.reference` (the spec in code), which the tests compare against; `kernels.modules`
wraps them as nn.Modules."""
__version__ = "0.2.0"   # the package version's one source (pyproject.toml reads it)
from . import reference
from .attention import attention
from .cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_from_logits
from .embedding import embed
from .int6 import int6_linear, pack_int6, unpack_int6
from .mlp import relu2_mlp
from .modules import Attention, FusedEmbedding, Int6Linear, ReLU2MLP, SoftcappedCrossEntropyLoss, XSAAttention
from .smear_embedding import smear_embed

__all__ = ["reference", "attention", "embed", "gptq_quantize", "gptq_quantize_batched", "int6_linear",
           "pack_int6", "relu2_mlp", "smear_embed", "softcapped_cross_entropy",
           "softcapped_cross_entropy_from_logits", "unpack_int6",
           "Attention", "FusedEmbedding", "Int6Linear", "ReLU2MLP", "SoftcappedCrossEntropyLoss", "XSAAttention"]


def __getattr__(name: str):
    # The GPTQ kernel is for quantisation only: loaded on first use, so evaluating an artifact never
    # imports it (and its bytes do not count toward the artifact's code size, crawler.budget).
    if name in ("gptq_quantize", "gptq_quantize_batched"):
        from . import gptq
        return getattr(gptq, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
