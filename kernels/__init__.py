"""Fused Triton ops for crawler transformers. Each public op here has an identically named plain-PyTorch
reference in `kernels.reference` (the spec in code), which the tests compare against."""
from . import reference
from .attention import attention

__all__ = ["reference", "attention"]
