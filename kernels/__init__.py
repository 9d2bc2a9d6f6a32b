"""Fused Triton ops for crawler transformers. Each public op here has an identically named plain-PyTorch
reference in `kernels.reference` (the spec in code), which the tests compare against."""
from . import reference
from .cross_entropy import softcapped_cross_entropy
from .embedding import embed
from .gptq import gptq_quantize, gptq_quantize_batched
from .mlp import relu2_mlp

__all__ = ["reference", "embed", "gptq_quantize", "gptq_quantize_batched", "relu2_mlp",
           "softcapped_cross_entropy"]
