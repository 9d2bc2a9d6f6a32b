"""The options every command line shares (train.py and python -m crawler.quantize / evaluate /
generate), defined once as an argparse parent parser; crawler.runtime turns them into a device, ops and
data paths (`resolve_device`, `resolve_ops`, `resolve_data`)."""
from __future__ import annotations

import argparse

from .runtime import OPS_CHOICES


def shared_options() -> argparse.ArgumentParser:
    """A parent parser (pass it as `parents=[shared_options()]`) with --device, --ops, --data-dir and
    --tokenizer in the groups "device and ops" and "data"."""
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
    return parser
