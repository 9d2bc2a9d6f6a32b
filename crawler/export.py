"""train_gpt.py, the one file of a submission's code (docs/submission.md): every module a run imports
(crawler.budget.counted_modules), stripped and compressed into a self-extracting text (kernels.bundle),
after one line with the run's options padded to OPTIONS_RESERVE_BYTES. crawler.budget counts its size
(the same for any run), python -m crawler.submission writes it.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

from kernels.bundle import carried, compress, compressed_form, module_form

from .budget import OPTIONS_RESERVE_BYTES, REPO_ROOT, counted_modules
from .errors import SetupError

# brotli: the smaller of the two (kernels.bundle prints both), and an export needs brotli anyway (artifacts).
EXPORT_COMPRESSOR = "brotli"
# What train_gpt.py runs once its modules are importable: train.py under the challenge's interface, with
# the run's options O (the first line).
EXPORT_TAIL = "import train\nfrom crawler.challenge import main\nraise SystemExit(main(train,O))\n"


@functools.cache
def exported_modules(root: Path = REPO_ROOT) -> dict[str, tuple[bool, str]]:
    """{module: (is package, stripped source)} of what train_gpt.py carries: the counted modules of the
    checkout at `root` (crawler.budget.counted_modules), stripped (kernels.bundle.carried)."""
    return carried(counted_modules(root))


@functools.cache
def exported_module(root: Path = REPO_ROOT) -> str:
    """The code train_gpt.py carries, uncompressed: exported_modules(root) with the loader and EXPORT_TAIL
    (kernels.bundle's module form)."""
    return module_form(exported_modules(root), tail=EXPORT_TAIL)


@functools.cache
def train_gpt_code(root: Path = REPO_ROOT) -> str:
    """Everything of train_gpt.py after its options line: exported_module(root), self-extracting."""
    return compressed_form(exported_module(root), EXPORT_COMPRESSOR)


def exported_code_bytes(root: Path = REPO_ROOT) -> int:
    """The size of the train_gpt.py exported from `root` for any run: its options line is padded to
    OPTIONS_RESERVE_BYTES (crawler.budget counts this)."""
    return OPTIONS_RESERVE_BYTES + len(train_gpt_code(root).encode("utf-8"))


def options_line(defaults: dict[str, str]) -> str:
    """train_gpt.py's first line: `O={...}` (the run's options as variables), padded to exactly
    OPTIONS_RESERVE_BYTES with a comment. SetupError when they do not fit."""
    line = f"O={defaults!r}#"
    room = OPTIONS_RESERVE_BYTES - len(line.encode("utf-8")) - 1
    if room < 0:
        raise SetupError(f"the run's options take {len(line.encode('utf-8')):,} B, more than the "
                         f"{OPTIONS_RESERVE_BYTES:,} B train_gpt.py reserves for them (crawler.budget); "
                         f"run with fewer options given explicitly")
    return line + "-" * room + "\n"


def train_gpt(defaults: dict[str, str], root: Path = REPO_ROOT) -> str:
    """The whole train_gpt.py of a run whose options are `defaults` (export_defaults)."""
    return options_line(defaults) + train_gpt_code(root)


def load_train(root: Path = REPO_ROOT):
    """The module train.py of the checkout (the one already imported, or loaded from root/train.py)."""
    if "train" in sys.modules:
        return sys.modules["train"]
    spec = importlib.util.spec_from_file_location("train", root / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def module_costs(root: Path = REPO_ROOT) -> list[tuple[str, int]]:
    """(module, its stripped source compressed alone) for each module train_gpt.py carries, largest first:
    which modules dominate it."""
    costs = [(name, len(compress(source.encode("utf-8"), EXPORT_COMPRESSOR)))
             for name, (_, source) in exported_modules(root).items()]
    return sorted(costs, key=lambda c: -c[1])
