"""One call to run a Parameter Golf train_gpt.py on our ops, in the spirit of Liger's
`apply_liger_kernel_to_*`:

    import train_gpt                                    # or, inside the script: sys.modules[__name__]
    from kernels.patch import patch_train_gpt
    print(patch_train_gpt(train_gpt))                   # before or after the model is built
    train_gpt.main()

`patch_train_gpt` recognises the script's family, replaces the forwards of its attention (+XSA), MLP,
embedding and loss with ones that call our ops where the script's code is the version whose math ours
reproduces, and returns a `PatchReport` of what it replaced and what it left in torch, and why. Parameters,
buffers, their names, shapes, initialisation and the records' 3-D weight banks are untouched: the state
dict is the same before and after, and a patched model trains, saves and loads like the unpatched one.

One file per script family (the integration with someone else's code, kept out of the ops):
  baseline.py       the challenge's baseline train_gpt.py (SDPA, (B, H, T, D))
  varlen_record.py  PR #1530's varlen record (FA3 varlen, XSA after it, Triton MLP, weight banks)
beside swap.py (a swap and the report), source.py (how a known method is told from an edited one) and
scripts.py (importing a script as a module, with an SDPA stand-in where FA3 is missing).
This package is not imported by `import kernels` (nor counted in the artifact's code bytes).
docs/porting.md is the guide: before and after, the manual swaps, what each changes in numerics and speed.
"""
from __future__ import annotations

import types

from . import baseline, varlen_record
from .scripts import load_script, sdpa_flash_attn_interface
from .swap import PatchReport

FAMILIES = (baseline, varlen_record)
OPS = ("triton", "reference")
_REPORT = "_kernels_patch_report"   # set on a patched script module: patching twice changes nothing

__all__ = ["PatchReport", "load_script", "patch_train_gpt", "sdpa_flash_attn_interface"]


def patch_train_gpt(script: types.ModuleType, *, ops: str = "triton") -> PatchReport:
    """Replace, on the classes of the train_gpt.py module `script`, the forwards our ops can run.

    script: the imported train_gpt.py module (`import train_gpt`, `kernels.patch.load_script(path)`, or
    `sys.modules[__name__]` from inside it) of a family in FAMILIES. ops: "triton" (the fused kernels; CUDA,
    or the CPU under TRITON_INTERPRET=1) or "reference" (kernels.reference: any device, float64). Every model
    of the script, built before or after, runs the new forwards; a second call returns the first report.
    Returns the PatchReport. Raises TypeError for a script that is not a module, ValueError for an
    unknown family or ops.
    """
    if not isinstance(script, types.ModuleType):
        raise TypeError(f"script: expected the train_gpt.py module object, got {type(script).__name__}")
    if ops not in OPS:
        raise ValueError(f"ops: expected one of {OPS}, got {ops!r}")
    previous = getattr(script, _REPORT, None)
    if previous is not None:
        return previous
    family = next((f for f in FAMILIES if f.matches(script)), None)
    if family is None:
        raise ValueError(f"script: {script.__name__} is not a train_gpt.py of a known family (the challenge's "
                         f"baseline, or PR #1530's varlen record): no GPT / CausalSelfAttention / MLP classes "
                         f"of their shape")
    report = PatchReport(family.FAMILY, ops)
    for swap in family.swaps(script, ops):
        swap.apply(script, report)
    report.kept.update(family.KEPT)
    setattr(script, _REPORT, report)
    return report
