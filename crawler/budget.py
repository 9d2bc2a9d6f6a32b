"""The 16,000,000-byte budget: artifact bytes + code bytes (decimal), where code bytes are the UTF-8 size
of the source files that evaluating an artifact imports (`python -m crawler.evaluate` on given shards).

Counted: the model and its config, the artifact container, bpb evaluation and legal TTT, the int6
inference path, the shard and tokenizer readers, the runtime policy and shared CLI options they use, and
every kernel module `import kernels` loads. Not counted: what only training and quantisation import
(the trainer, the quantiser, checkpoints, the built-in corpus builder, this file, train.py), the GPTQ
kernel (`kernels/__init__` loads it on first use), the offline build check, benchmarks and tests.
tests/test_artifact.py checks that this list is exactly what `import crawler.evaluate` loads from the repository.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from .artifact import BROTLI_QUALITY, brotli_module

BUDGET_BYTES = 16_000_000                  # Parameter Golf's limit, decimal bytes
CODE_FILE_PATTERNS = (
    "crawler/__init__.py", "crawler/artifact.py", "crawler/bpb.py", "crawler/cli.py", "crawler/config.py",
    "crawler/data.py", "crawler/documents.py", "crawler/errors.py", "crawler/evaluate.py", "crawler/fileio.py",
    "crawler/inference.py",
    "crawler/model.py", "crawler/runtime.py", "crawler/tokenizer.py", "crawler/ttt.py", "kernels/*.py",
)
NOT_IMPORTED_BY_EVALUATION = ("kernels/gptq.py", "kernels/build_check.py")   # quantisation / dev tool only
REPO_ROOT = Path(__file__).resolve().parent.parent


def code_files(root: str | os.PathLike = REPO_ROOT) -> list[Path]:
    """The existing source files counted as code bytes, sorted (CODE_FILE_PATTERNS minus
    NOT_IMPORTED_BY_EVALUATION)."""
    root = Path(root)
    skip = {root / p for p in NOT_IMPORTED_BY_EVALUATION}
    return sorted({p for pattern in CODE_FILE_PATTERNS for p in root.glob(pattern) if p.is_file()} - skip)


@functools.cache
def _code_bytes(root: Path) -> tuple[int, int]:
    data = b"".join(p.read_bytes() for p in code_files(root))
    return len(data), len(brotli_module().compress(data, quality=BROTLI_QUALITY))


def code_bytes(root: str | os.PathLike = REPO_ROOT) -> tuple[int, int]:
    """(raw UTF-8 bytes, brotli-11 bytes) of code_files(root), the latter over their concatenation.
    Computed once per process and root: the source does not change while a run uses it, and brotli-11
    over the code takes about a second (once per quantisation plan otherwise)."""
    return _code_bytes(Path(root).resolve())


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Artifact and code bytes against the budget. The budget counts raw code bytes (the conservative
    rule PR #1579 used); the brotli size is reported for comparison with minified submissions."""
    artifact_bytes: int
    code_bytes: int
    code_bytes_brotli: int
    budget: int = BUDGET_BYTES

    @property
    def total(self) -> int:
        return self.artifact_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def summary(self) -> str:
        return (f"artifact {self.artifact_bytes:,} B + code {self.code_bytes:,} B (brotli-11 "
                f"{self.code_bytes_brotli:,} B) = {self.total:,} B of {self.budget:,} B budget: "
                f"{'fits' if self.fits else f'OVER by {self.total - self.budget:,} B'}")

    def check(self) -> None:
        """Raise ValueError with the numbers when artifact + code bytes exceed the budget."""
        if not self.fits:
            raise ValueError(f"over the size budget: {self.summary()}; prune (--target-bytes) or lower "
                             f"the bits/k of a role")


def size_report(artifact_bytes: int, root: str | os.PathLike = REPO_ROOT,
                budget: int = BUDGET_BYTES) -> SizeReport:
    """A SizeReport of `artifact_bytes` and the code bytes of `root`."""
    raw, compressed = code_bytes(root)
    return SizeReport(artifact_bytes, raw, compressed, budget)
