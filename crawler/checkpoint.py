"""Checkpoint files, read in one place and written atomically.

Three kinds of file hold a model's weights, and `read_checkpoint` reads them all:
  * "training": the trainer's resumable `checkpoint.pt` (format tag TRAINING_FORMAT, a version, the model
    config as JSON under "model_config", the state dict under "model", and the optimiser, averaging,
    loader and RNG states that `crawler.training.loop` writes and restores);
  * "model": the trainer's `final_model.pt`, the weights a run ends with (format tag MODEL_FORMAT);
  * "state_dict": a plain state dict of tensors, such as PR #1579's `final_model.pt`; its config comes
    from a preset.
Files are read with `torch.load(weights_only=True)`, so loading a hostile file cannot run code. Prefixes
added by torch.compile ("_orig_mod.") and DDP ("module.") are removed from parameter names, and PR #1579's
(1,)-shaped value-embedding scales become 0-d.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import load_state_into
from .config import CrawlerConfig
from .errors import SetupError
from .fileio import atomic_open
from .model import CrawlerGPT, seed_scale_shapes

TRAINING_FORMAT = "crawler-train-checkpoint"
TRAINING_VERSION = 1
MODEL_FORMAT = "crawler-model"
KINDS = ("training", "model", "state_dict")
_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


class CheckpointError(SetupError):
    """A file that is not a readable checkpoint of the kind asked for; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents. `kind` is one of KINDS; `state_dict` the model weights (wrapper
    prefixes removed); `config` the model config (None for a plain state dict read without a preset);
    `contents` the whole file as loaded (for "training", everything a resume restores)."""
    path: Path
    kind: str
    state_dict: dict[str, torch.Tensor]
    config: CrawlerConfig | None
    contents: dict


def _load(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds (UnpicklingError, RuntimeError, EOFError ...)
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read as a trainer checkpoint or state dict "
                              f"({type(e).__name__}: {e}); it may be truncated or not a checkpoint") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a dict, got {type(contents).__name__}")
    return contents


def read_checkpoint(path: str | os.PathLike, *, preset: str | None = None, expect: str | None = None) -> Checkpoint:
    """Read a checkpoint file of any kind (module docstring). `preset` names the config of a plain state
    dict (or of a trainer file without one). `expect` ("training", ...) refuses every other kind; a
    training checkpoint must also have this code's version. Raises CheckpointError (a SetupError) for a
    missing, unreadable or truncated file, a file of another kind, or a config that cannot be built."""
    path = Path(path)
    contents = _load(path)
    fmt = contents.get("format")
    if isinstance(contents.get("model"), dict):
        kind = "training" if fmt == TRAINING_FORMAT else "model"
        state = contents["model"]
        config = contents.get("model_config", contents.get("config"))
        if isinstance(config, str):
            config = json.loads(config)
    elif contents and all(isinstance(v, torch.Tensor) for v in contents.values()):
        kind, state, config = "state_dict", contents, None
    else:
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a trainer checkpoint (keys 'model', "
                              f"'model_config') or a state dict of tensors, got keys {sorted(contents)[:8]}")
    if expect is not None and kind != expect:
        raise CheckpointError(f"{str(path)!r} is not a {'trainer' if expect == 'training' else expect} "
                              f"checkpoint (format tag missing)")
    if kind == "training" and contents.get("version") != TRAINING_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {contents.get('version')}, this code "
                              f"reads version {TRAINING_VERSION}")
    try:
        if isinstance(config, dict):
            config = CrawlerConfig.from_dict(config)
        elif preset:
            config = CrawlerConfig.preset(preset)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: invalid model config ({e})") from None
    state = seed_scale_shapes({_WRAPPER_PREFIX.sub("", k): v for k, v in state.items()})
    return Checkpoint(path, kind, state, config, contents)


def model_from_checkpoint(path: str | os.PathLike, *, preset: str | None = None, device="cpu",
                          ops="auto") -> CrawlerGPT:
    """A CrawlerGPT holding a checkpoint's weights on `device` (any kind; `preset` for a plain state
    dict). Built on the meta device, so no weight is initialised only to be overwritten. Raises
    CheckpointError for an unreadable file or a plain state dict without `preset`."""
    ckpt = read_checkpoint(path, preset=preset)
    if ckpt.config is None:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds no model config ({ckpt.kind}); pass --preset")
    with torch.device("meta"):
        model = CrawlerGPT(ckpt.config, ops=ops)
    return load_state_into(model, ckpt.state_dict, device=device)


def save_checkpoint(path: str | os.PathLike, contents: dict) -> None:
    """Write a checkpoint's `contents` (tensors and plain containers only) atomically: a crash mid-write
    leaves the previous file. The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(contents, f)


def save_model(path: str | os.PathLike, config: CrawlerConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a "model" checkpoint (final_model.pt): the config as JSON and the weights."""
    save_checkpoint(path, {"format": MODEL_FORMAT, "model_config": config.to_json(), "model": state_dict})
