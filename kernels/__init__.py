"""Fused Triton ops for crawler transformers. Each public op here has an identically named plain-PyTorch
reference in `kernels.reference` (the spec in code), which the tests compare against."""
from . import reference
from .int6 import int6_linear, pack_int6, unpack_int6

__all__ = ["reference", "pack_int6", "unpack_int6", "int6_linear"]
