"""Token data: FineWeb-format shard I/O (docs/math.md §6) and the validation tokens with their byte
look-up tables. The rank-aware training stream over the train shards is crawler.training.stream; the
built-in corpus that writes such shards from the Python installation's own documentation is
crawler.corpus.

Shard format: a header of 256 little-endian int32 (`[0] = 20240520` magic, `[1] = 1` version,
`[2] = n_tokens`, rest zero) followed by `n_tokens` little-endian uint16 ids; file size `1024 + 2n`.

Token ids are range-checked where they enter a run (`check_token_range`): each shard once, when it is
read for a model of a given vocabulary, so the training step never pays for it. Problems with a data
file are SetupErrors (ValueErrors) naming the file; a missing one is a MissingFileError (a
FileNotFoundError).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .documents import check_tokenizer_bos
from .errors import MissingFileError, SetupError
from .fileio import atomic_open
from .tokenizer import byte_luts, load_checked_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")


# --------------------------------------------------------------------------------------------------
# Shard I/O

def shard_length(path: Path) -> int:
    """Validate the header and file size of a shard and return its token count (SetupError naming the
    file and the problem, MissingFileError for a missing file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise MissingFileError(f"shard {str(path)!r} does not exist") from None
    except OSError as e:
        raise SetupError(f"shard {str(path)!r} cannot be read ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise SetupError(f"shard {str(path)!r}: file is {size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype=_HEADER_DTYPE)
    if header[0] != SHARD_MAGIC:
        raise SetupError(f"shard {str(path)!r}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); "
                         f"not a FineWeb token shard")
    if header[1] != SHARD_VERSION:
        raise SetupError(f"shard {str(path)!r}: unsupported version {int(header[1])} "
                         f"(expected {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        problem = "truncated" if size < expected else "trailing bytes"
        raise SetupError(f"shard {str(path)!r}: size mismatch ({problem}): header says {n} tokens, "
                         f"so {expected} bytes, but the file is {size} bytes")
    return n


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """SetupError unless every id in `tokens` (a numpy integer array, read from `where`) is below
    `vocab_size`: a larger id would index past the model's embedding."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise SetupError(f"{where}: token id {int(tokens.max())} >= the model's vocab_size {vocab_size}: the data "
                         f"was encoded with another tokenizer; use the data and tokenizer of this model")


def read_shard_array(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """A validated shard's tokens as a native-endian uint16 numpy array (see `read_shard`); with
    `vocab_size`, every id is checked to be below it (`check_token_range`)."""
    n = shard_length(path)
    tokens = np.fromfile(path, dtype=_TOKEN_DTYPE, count=n, offset=HEADER_BYTES).astype(np.uint16, copy=False)
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, f"shard {str(path)!r}")
    return tokens


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> torch.Tensor:
    """Read a FineWeb-format shard: returns a 1-D torch.uint16 tensor of its n_tokens ids.

    Raises MissingFileError (a FileNotFoundError) for a missing file and SetupError (a ValueError,
    naming the file and the problem) for a file shorter than the header, a bad magic, an unsupported
    version, a size that disagrees with the header's token count (truncated file or trailing bytes),
    or, with `vocab_size`, an id >= vocab_size.
    """
    return torch.from_numpy(read_shard_array(Path(path), vocab_size))


def write_shard(path: str | os.PathLike, tokens: torch.Tensor | np.ndarray | Sequence[int]) -> None:
    """Write 1-D integer `tokens` (any integer dtype, values in [0, 65535]) as a FineWeb-format shard.

    The write is atomic: a temporary file in the same directory replaces `path` only when complete.
    Raises TypeError for non-integer tokens and ValueError for a non-1-D input or out-of-range ids.
    """
    if isinstance(tokens, torch.Tensor):
        # torch's uint16 has few ops; widen before handing over to numpy.
        tokens = tokens.detach().cpu().to(torch.int64).numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"write_shard({str(path)!r}): tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"write_shard({str(path)!r}): tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise ValueError(f"write_shard({str(path)!r}): token ids must be in [0, 65535] to fit uint16, "
                         f"got min {int(arr.min())}, max {int(arr.max())}")
    header = np.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    with atomic_open(path) as f:
        f.write(header.tobytes())
        f.write(arr.astype(_TOKEN_DTYPE, copy=False).tobytes())


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Sorted paths of `data_dir/fineweb_{split}_*.bin` (split is "train" or "val").

    Raises MissingFileError (a FileNotFoundError) naming the directory and the pattern when the
    directory is missing or no file matches.
    """
    data_dir = Path(data_dir)
    pattern = f"fineweb_{split}_*.bin"
    if not data_dir.is_dir():
        raise MissingFileError(f"data directory {str(data_dir)!r} does not exist (looking for {pattern})")
    paths = sorted(data_dir.glob(pattern))
    if not paths:
        raise MissingFileError(f"no shards matching {pattern!r} in {str(data_dir)!r}")
    return paths


def load_validation_tokens(data_dir: str | os.PathLike, *, max_tokens: int | None = None,
                           vocab_size: int | None = None) -> torch.Tensor:
    """The validation tokens of `data_dir` (its `fineweb_val_*.bin` shards in sorted order),
    concatenated: a 1-D torch.uint16 tensor, kept compact (FineWeb's val split is ~62M tokens); cast
    windows to int64 before indexing with them. Evaluation trims the stream to its window size;
    `max_tokens` keeps only the first tokens (quick evaluations, >= 2). With `vocab_size`, SetupError
    if a token id does not fit a model of that vocabulary (shards of another tokenizer)."""
    if max_tokens is not None and max_tokens < 2:
        raise SetupError(f"max_val_tokens must be >= 2, got {max_tokens}")
    shards = [read_shard_array(p, vocab_size) for p in list_shards(data_dir, "val")]
    tokens = torch.from_numpy(np.concatenate(shards))
    return tokens[:max_tokens] if max_tokens is not None else tokens


def load_eval_data(data_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, vocab_size: int, *,
                   max_tokens: int | None = None, trained_with: dict | None = None,
                   allow_mismatch: bool = False, doc_isolated: bool = False) -> tuple[torch.Tensor, tuple]:
    """What scoring a model of `vocab_size` reads: (validation tokens, byte LUTs of the tokenizer).
    The tokenizer is checked here, once per run (`load_checked_tokenizer`: its size, and its identity
    against `trained_with`, the one the model records; `allow_mismatch` accepts a deliberate change; for
    a `doc_isolated` run, that it marks documents with a BOS: crawler.documents.check_tokenizer_bos),
    and every validation id must be one of the tokenizer's (an id it cannot decode would count 0 bytes).
    Raises MissingFileError / SetupError naming the missing or mismatched file."""
    sp, _ = load_checked_tokenizer(tokenizer_path, vocab_size, trained_with=trained_with,
                                   allow_mismatch=allow_mismatch)
    if doc_isolated:
        check_tokenizer_bos(sp.bos_id(), str(tokenizer_path))
    tokens = load_validation_tokens(data_dir, max_tokens=max_tokens, vocab_size=vocab_size)
    if tokens.numel() and int(tokens.numpy().max()) >= sp.vocab_size():    # torch has no max() for uint16
        raise SetupError(f"validation shards in {str(data_dir)!r} hold token id {int(tokens.numpy().max())}, "
                         f"beyond the {sp.vocab_size()} pieces of tokenizer {str(tokenizer_path)!r}: the shards "
                         f"were encoded with another tokenizer; pass the one they were encoded with")
    return tokens, byte_luts(sp, vocab_size)
