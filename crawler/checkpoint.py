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

Integrity: the writers store the SHA-256 of everything else in the file (`contents_sha256`: every
tensor's dtype, shape and bytes and every plain value, in order) under INTEGRITY_KEY, and the reader
recomputes it, so a flipped bit anywhere is refused by name instead of resuming or quantising silently.
Trainer files written before the checksum existed still load, with an UnverifiedWarning; plain state
dicts (PR #1579's) carry none and load as they are. "model" files also record the tokenizer the weights
were trained with (`Checkpoint.tokenizer`; a training checkpoint has it in its data identity), which
evaluation checks (crawler.tokenizer.check_tokenizer).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CrawlerConfig
from .errors import SetupError, UnverifiedWarning
from .fileio import write_bytes
from .model import CrawlerGPT, load_state_into, seed_scale_shapes

TRAINING_FORMAT = "crawler-train-checkpoint"
TRAINING_VERSION = 1
MODEL_FORMAT = "crawler-model"
KINDS = ("training", "model", "state_dict")
INTEGRITY_KEY = "sha256"                   # hex SHA-256 of the rest of the contents (contents_sha256)
_WRAPPER_PREFIX = re.compile(r"^(module\.|_orig_mod\.)+")


class CheckpointError(SetupError):
    """A file that is not a readable checkpoint of the kind asked for; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents. `kind` is one of KINDS; `state_dict` the model weights (wrapper
    prefixes removed); `config` the model config (None for a plain state dict read without a preset);
    `contents` the whole file as loaded (for "training", everything a resume restores); `tokenizer` the
    identity {"sha256", "vocab_size"} of the tokenizer the weights were trained with (None when the
    file does not record one: plain state dicts and files written before it was recorded)."""
    path: Path
    kind: str
    state_dict: dict[str, torch.Tensor]
    config: CrawlerConfig | None
    contents: dict
    tokenizer: dict | None = None


def _hash_into(h, obj) -> None:
    """Feed `obj` (tensors and plain containers, as checkpoints hold) into hash `h`, type-tagged so that
    no two different contents feed the same bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _hash_into(h, key)
            _hash_into(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for value in obj:
            _hash_into(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        text = obj.hex() if isinstance(obj, bytes) else repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(f"checkpoint contents: cannot hash a {type(obj).__name__} (tensors and plain "
                        f"containers only)")


def contents_sha256(contents: dict) -> str:
    """Hex SHA-256 of a checkpoint's contents without its INTEGRITY_KEY entry: every tensor's dtype,
    shape and bytes and every plain value, in the dict's order (torch.load keeps it)."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in contents.items() if k != INTEGRITY_KEY})
    return h.hexdigest()


def _verify(path: Path, contents: dict, kind: str) -> None:
    """CheckpointError when the stored checksum disagrees with the contents; an UnverifiedWarning for a
    trainer file written before checksums (plain state dicts never carry one)."""
    if kind == "state_dict":
        return
    stored = contents.get(INTEGRITY_KEY)
    if stored is None:
        warnings.warn(f"checkpoint {str(path)!r} has no checksum (written before checkpoints carried one): it "
                      f"cannot be verified", UnverifiedWarning, stacklevel=3)
        return
    if stored != contents_sha256(contents):
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its contents do not match the checksum "
                              f"stored when it was written (changed or damaged since); use another copy")


def _load(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
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
    _verify(path, contents, kind)
    try:
        if isinstance(config, dict):
            config = CrawlerConfig.from_dict(config)
        elif preset:
            config = CrawlerConfig.preset(preset)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: invalid model config ({e})") from None
    state = seed_scale_shapes({_WRAPPER_PREFIX.sub("", k): v for k, v in state.items()})
    return Checkpoint(path, kind, state, config, contents, _recorded_tokenizer(contents, kind))


def _recorded_tokenizer(contents: dict, kind: str) -> dict | None:
    if kind == "model":
        return contents.get("tokenizer")
    data = contents.get("data") if kind == "training" else None
    if isinstance(data, dict) and "tokenizer_sha256" in data:
        return {"sha256": data["tokenizer_sha256"], "vocab_size": data["tokenizer_vocab_size"]}
    return None


def model_from_checkpoint(path: str | os.PathLike | Checkpoint, *, preset: str | None = None, device="cpu",
                          ops="auto") -> CrawlerGPT:
    """A CrawlerGPT holding a checkpoint's weights on `device` (a file of any kind, `preset` for a plain
    state dict, or a Checkpoint already read). Built on the meta device, so no weight is initialised
    only to be overwritten. Raises CheckpointError for an unreadable file, a plain state dict without
    `preset`, or weights that do not fit the config."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path, preset=preset)
    if ckpt.config is None:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} holds no model config ({ckpt.kind}); pass --preset")
    with torch.device("meta"):
        model = CrawlerGPT(ckpt.config, ops=ops)
    try:
        return load_state_into(model, ckpt.state_dict, device=device)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r}: {e} (wrong --preset?)") from None


def save_checkpoint(path: str | os.PathLike, contents: dict) -> None:
    """Write a checkpoint's `contents` (tensors and plain containers only) atomically with its checksum
    under INTEGRITY_KEY: a crash or a full disk mid-write leaves the previous file. The parent directory
    is created. Raises crawler.fileio.WriteError when the file cannot be written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised in memory first: torch.save reports a failed write to a file as an opaque
    # "unexpected pos" RuntimeError; written as bytes, a full disk is an OSError that WriteError explains.
    buffer = io.BytesIO()
    torch.save({**contents, INTEGRITY_KEY: contents_sha256(contents)}, buffer)
    write_bytes(path, buffer.getbuffer())


def save_model(path: str | os.PathLike, config: CrawlerConfig, state_dict: dict[str, torch.Tensor], *,
               tokenizer: dict | None = None) -> None:
    """Write a "model" checkpoint (final_model.pt): the config as JSON, the weights, and the identity
    {"sha256", "vocab_size"} of the tokenizer they were trained with (crawler.tokenizer.tokenizer_identity)."""
    contents = {"format": MODEL_FORMAT, "model_config": config.to_json(), "model": state_dict}
    if tokenizer is not None:
        contents["tokenizer"] = tokenizer
    save_checkpoint(path, contents)
