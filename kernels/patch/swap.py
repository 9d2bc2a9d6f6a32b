"""A swap (some forwards of a script replaced by ours, where the script's code is the version we know) and
the report of what a patch did.

A swap names the script's methods (and functions) its forwards reproduce, each with the digest of the
version whose math was checked against ours (`source.source_digest`). It is installed only when every one
of them still has that digest; otherwise the script keeps its own code and the report says which method
differs and which of its attributes the patched forward would not have read (an unknown SmearGate, say).
Forwards are set on the script's classes, so every model the script builds, before or after the patch,
runs them; parameters, buffers and their names are never touched.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..modules import select_op
from .source import method_source, self_attributes, source_digest

PATCH_OPS = ("attention", "relu2_mlp", "embed", "softcapped_cross_entropy")   # what the swaps call


@dataclasses.dataclass
class PatchReport:
    """What `patch_train_gpt` did to one script module.

    family: the script family recognised; ops: "triton" or "reference"; patched: {"Class.method": what
    runs there now}; kept: {what stays the script's torch code: why}.
    """
    family: str
    ops: str
    patched: dict[str, str] = dataclasses.field(default_factory=dict)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"kernels.patch: {self.family}, ops={self.ops}",
                 f"patched ({len(self.patched)}):"]
        lines += [f"  {where}: {what}" for where, what in self.patched.items()]
        lines.append(f"left in torch ({len(self.kept)}):")
        lines += [f"  {what}: {why}" for what, why in self.kept.items()]
        return "\n".join(lines)


def patch_ops(ops) -> list:
    """The functions of PATCH_OPS for an ops kind ("triton" or "reference", kernels.modules.select_op)."""
    return [select_op(ops, name) for name in PATCH_OPS]


def op_name(ops: str, op: str) -> str:
    """How the report names op `op` of an ops kind: kernels.<op> or kernels.reference.<op>."""
    return f"kernels.{op}" if ops == "triton" else f"kernels.reference.{op}"


def lookup(script, dotted: str):
    """script.<Class>.<method> or script.<function> for "Class.method" / "function"; None when missing."""
    obj = script
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclasses.dataclass(frozen=True)
class Swap:
    """One swap: `forwards` ({"Class.method": our function}) replace the script's methods, provided each
    entry of `known` ({"Class.method" or "function": digest}) has that digest in the script. `name` says
    what is swapped, `runs` what runs instead; `helpers` are module functions our forwards call with the
    model (their `self.` reads count as the forwards' own in the report)."""
    name: str
    runs: str
    forwards: dict[str, Callable]
    known: dict[str, str]
    helpers: tuple[Callable, ...] = ()

    def _attributes_read(self) -> set[str]:
        return set().union(*(self_attributes(method_source(fn)) for fn in (*self.forwards.values(), *self.helpers)))

    def mismatch(self, script) -> str | None:
        """Why this swap cannot be installed in `script`, or None when every known method matches."""
        missing = [dotted for dotted in self.forwards if lookup(script, dotted) is None]
        if missing:
            return f"the script has no {', '.join(missing)}"
        for dotted, digest in self.known.items():
            fn = lookup(script, dotted)
            if fn is None:
                return f"the script has no {dotted}"
            source = method_source(fn)
            if source is None:
                return f"the source of {dotted} is not available to compare"
            if source_digest(source) != digest:
                unknown = sorted(self_attributes(source) - self._attributes_read()) if "." in dotted else []
                also = f"; it reads self.{', self.'.join(unknown)}, which ours would not" if unknown else ""
                return f"{dotted} is not the version this patch reproduces{also}"
        return None

    def apply(self, script, report: PatchReport) -> bool:
        """Install the forwards on the script's classes (True), or record in `report` why not (False)."""
        why = self.mismatch(script)
        if why is not None:
            report.kept[self.name] = why
            return False
        for dotted, fn in self.forwards.items():
            owner, _, name = dotted.rpartition(".")
            setattr(lookup(script, owner) if owner else script, name, fn)
            report.patched[dotted] = self.runs
        return True
