"""Fused Triton ops for crawler transformers. Each public op here has an identically named plain-PyTorch
reference in `kernels.reference` (the spec in code), which the tests compare against (attention_decode's
is `reference.attention` over each sequence's valid keys); `kernels.modules` wraps them as nn.Modules."""
__version__ = "0.2.0"   # the package version's one source (pyproject.toml reads it)
from . import reference
from .attention import attention
from .attention_decode import attention_decode
from .cross_entropy import softcapped_cross_entropy, softcapped_cross_entropy_from_logits
from .embedding import embed
from .mlp import relu2_mlp
from .modules import Attention, FusedEmbedding, Int6Linear, ReLU2MLP, SoftcappedCrossEntropyLoss, XSAAttention

__all__ = ["reference", "attention", "attention_decode", "embed", "gptq_quantize", "gptq_quantize_batched",
           "int6_linear", "pack_int6", "relu2_mlp", "smear_embed", "softcapped_cross_entropy",
           "softcapped_cross_entropy_from_logits", "unpack_int6",
           "Attention", "FusedEmbedding", "Int6Linear", "ReLU2MLP", "SoftcappedCrossEntropyLoss", "XSAAttention"]


def __getattr__(name: str):
    # Ops a training run never calls are loaded on first use, so that a run imports only what it runs and an
    # exported train_gpt.py need not carry the rest (crawler.budget.NOT_EXPORTED): GPTQ is for quantisation
    # only, the int6 matmul for inference on packed weights (crawler.inference), smear_embed for the record
    # line's models. kernels.bundle.op_exports reads which names each branch loads from which module.
    if name in ("gptq_quantize", "gptq_quantize_batched"):
        from . import gptq as module
    elif name in ("int6_linear", "pack_int6", "unpack_int6"):
        from . import int6 as module
    elif name == "smear_embed":
        from . import smear_embedding as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(module, name)     # found here from now on, without this call
    return value
