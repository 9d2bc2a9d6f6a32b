"""The 16,000,000-byte budget: artifact bytes + code bytes (decimal).

Code bytes are what the challenge counts: the size of the submission's train_gpt.py, the one file that must
hold all of its code, as `python -m crawler.submission` exports it (docs/submission.md). That file carries
every module training, quantisation and scoring import (`counted_modules`: the import closure of
EXPORT_ROOTS, minus NOT_EXPORTED), stripped and compressed into one self-extracting file (kernels.bundle),
after one line with the run's options, padded to OPTIONS_RESERVE_BYTES. So the count is known before a
run's options are, and is the same number in the two places it is taken: a run from the checkout builds
the export in memory (once per process), and the exported train_gpt.py, running, counts its own size. A
train.py run therefore prunes its artifact exactly as its export's run does.

The report also gives the raw bytes of the counted source files, the size a submission of the files as
they are would count. tests/test_submission.py checks that the counted modules are exactly those a run
imports.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

BUDGET_BYTES = 16_000_000                  # Parameter Golf's limit, decimal bytes
# The modules an exported train_gpt.py starts from: train.py's stages and the challenge's interface.
EXPORT_ROOTS = ("train", "crawler.challenge")
# Modules an export leaves out, and why: each may be imported only inside a function that an export never
# calls (kernels.bundle.import_closure refuses one imported at module level, so none is ever counted).
NOT_EXPORTED = {
    "crawler.corpus": "builds the built-in corpus; an export always reads the challenge's data",
    "crawler.submission": "writes the records folder",
    "crawler.export": "builds train_gpt.py (an export counts its own file instead)",
    "kernels.bundle": "builds the export",
    "crawler.inference": "int6 inference (python -m crawler.evaluate, crawler.generate); "
                         "train.py scores the artifact's dequantised model",
    "kernels.int6": "the int6 matmul on packed weights, crawler.inference's",
    "kernels.smear_embedding": "the record line's embedding; the crawler model embeds with kernels.embedding",
    "kernels.patch": "puts our ops into a user's own script (docs/porting.md); an export runs train.py's",
}
# The first line of an exported train_gpt.py: the run's options, padded to this many bytes.
OPTIONS_RESERVE_BYTES = 1024
REPO_ROOT = Path(__file__).resolve().parent.parent


def exported_file() -> Path | None:
    """The train_gpt.py this package is running from when it runs as an export (kernels.bundle's loader
    gives its modules that file as `__spec__.origin`, and each a `__file__` below it), else None."""
    origin = getattr(__spec__, "origin", None)
    return Path(origin) if origin and origin != __file__ else None


def counted_modules(root: str | os.PathLike = REPO_ROOT) -> dict:
    """{module name: kernels.bundle.SourceModule} of the modules an exported train_gpt.py carries: every
    module of `root` that importing EXPORT_ROOTS can import, except NOT_EXPORTED. (An installed package
    has no train.py: then those the other roots import.) Read once per process and root."""
    return _counted_modules(Path(root).resolve())


@functools.cache
def _counted_modules(root: Path) -> dict:
    from kernels.bundle import find_module, import_closure  # a tool of the checkout: exports never run it
    roots = [name for name in EXPORT_ROOTS if find_module(name, root) is not None]
    return import_closure(roots, root=root, exclude=NOT_EXPORTED)


def code_files(root: str | os.PathLike = REPO_ROOT) -> list[Path]:
    """The source files of counted_modules(root), sorted."""
    return sorted(m.path for m in counted_modules(root).values())


@dataclasses.dataclass(frozen=True)
class CodeSize:
    """Code bytes: `counted` (the exported train_gpt.py) and `source` (the counted source files as they
    are; None when running as the export, which carries them stripped)."""
    counted: int
    source: int | None


@functools.cache
def _code_size(root: Path) -> CodeSize:
    exported = exported_file()
    if exported is not None:
        return CodeSize(exported.stat().st_size, None)
    from .export import exported_code_bytes  # builds train_gpt.py; exports never run it
    return CodeSize(exported_code_bytes(root), sum(p.stat().st_size for p in code_files(root)))


def code_bytes(root: str | os.PathLike = REPO_ROOT) -> CodeSize:
    """The CodeSize of the checkout at `root` (or of the running export). Computed once per process and
    root: the source does not change while a run uses it, and building the export takes one to two seconds."""
    return _code_size(Path(root).resolve())


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Artifact and code bytes against the budget. `code_bytes` is what counts (the exported train_gpt.py);
    `code_bytes_source` the raw bytes of the counted source files, for comparison (None running as the
    export)."""
    artifact_bytes: int
    code_bytes: int
    budget: int = BUDGET_BYTES
    code_bytes_source: int | None = None

    @property
    def total(self) -> int:
        return self.artifact_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def summary(self) -> str:
        source = (f"; {self.code_bytes_source:,} B as source files" if self.code_bytes_source is not None
                  else "; this file")
        return (f"artifact {self.artifact_bytes:,} B + code {self.code_bytes:,} B (train_gpt.py{source}) = "
                f"{self.total:,} B of {self.budget:,} B budget: "
                f"{'fits' if self.fits else f'OVER by {self.total - self.budget:,} B'}")

    def check(self) -> None:
        """Raise ValueError with the numbers when artifact + code bytes exceed the budget."""
        if not self.fits:
            raise ValueError(f"over the size budget: {self.summary()}; prune (--target-bytes) or lower "
                             f"the bits/k of a role")


def size_report(artifact_bytes: int, root: str | os.PathLike = REPO_ROOT,
                budget: int = BUDGET_BYTES) -> SizeReport:
    """A SizeReport of `artifact_bytes` and the code bytes of `root` (code_bytes)."""
    code = code_bytes(root)
    return SizeReport(artifact_bytes, code.counted, budget, code.source)
