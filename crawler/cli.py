"""What every command line shares (train.py and python -m crawler.quantize / evaluate / generate): the
common options, defined once as an argparse parent parser (crawler.runtime turns them into a device,
ops and data paths: `resolve_device`, `resolve_ops`, `resolve_data`), argument types that refuse an
out-of-range number while parsing (`int_at_least`, and `FloatRange` for every float option: finite, in
its range), and `run_main`, the one way a command turns an expected failure
into one line and an exit status.

Exit statuses: 0 success; 1 the command's own "no" (quantize: the artifact does not fit the budget);
2 an error the user can fix (a SetupError, a failed read or write), printed as `<prog>: error: ...`
without a traceback, as argparse prints a bad option; 130 interrupted. A traceback means a bug.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SetupError, UnverifiedWarning
from .runtime import OPS_CHOICES

ERROR_EXIT, INTERRUPTED_EXIT = 2, 130


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type`: an integer >= `low`, else the parser's one-line error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = "int"      # argparse names the type in its "invalid int value" fallback
    return parse


@dataclass(frozen=True)
class FloatRange:
    """The finite floats from `low` to `high` (each end included unless `low_open` / `high_open`). Called
    with an option's text it is an argparse `type`: the parsed value, or the parser's one-line error
    naming the option (so nan, inf or an out-of-range value never reaches the work); `problem(value)`
    is the same check of a value from elsewhere (a resumed checkpoint's options)."""
    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return (f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")

    def problem(self, value) -> str | None:
        """"expected <range>, got <value>" unless `value` is a finite number in the range; None if it is."""
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > self.low if self.low_open else value >= self.low)
              and (value < self.high if self.high_open else value <= self.high))
        return None if ok else f"expected {self}, got {value!r}"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self}, got {text!r}") from None
        problem = self.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value


def shared_options() -> argparse.ArgumentParser:
    """A parent parser (pass it as `parents=[shared_options()]`) with --device, --ops, --data-dir,
    --tokenizer and --allow-tokenizer-mismatch in the groups "device and ops" and "data"."""
    parser = argparse.ArgumentParser(add_help=False)
    run = parser.add_argument_group("device and ops")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; under torchrun a "
                          "bare cuda is cuda:LOCAL_RANK (default: auto)")
    run.add_argument("--ops", choices=OPS_CHOICES, default="auto",
                     help="model ops: triton (the Triton kernels), reference (the plain-PyTorch references) "
                          "or auto (Triton on CUDA, the references elsewhere) (default: auto)")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="directory of FineWeb-format shards fineweb_{train,val}_*.bin (default: the "
                           "built-in corpus at the model's vocab size, built and cached on first use)")
    data.add_argument("--tokenizer", default=None,
                      help="SentencePiece .model the shards were encoded with (default: "
                           "<data-dir>/tokenizer.model)")
    data.add_argument("--allow-tokenizer-mismatch", action="store_true",
                      help="accept a tokenizer other than the one the model was trained with (its size and "
                           "SHA-256 are recorded in checkpoints and artifacts), or one with fewer pieces than "
                           "the model's vocabulary: for a deliberate change only (default: refused)")
    return parser


def run_main(prog: str, body: Callable[[], int]) -> int:
    """Run a command's `body` and return its exit status. An expected failure (a SetupError, including
    crawler.fileio.WriteError and the artifact and checkpoint errors, or an OSError from the system)
    prints one `prog: error: ...` line and returns 2; Ctrl-C returns 130. An UnverifiedWarning (a file
    of an older format that loads without a check) prints one `prog: warning: ...` line. Anything else
    is a bug and keeps its traceback."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UnverifiedWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        original = warnings.showwarning
        warnings.showwarning = show
        try:
            return body()
        except (SetupError, OSError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return ERROR_EXIT
        except KeyboardInterrupt:
            print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
            return INTERRUPTED_EXIT
