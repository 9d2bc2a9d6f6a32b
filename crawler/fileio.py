"""File helpers shared across the package: atomic output for every writer (shards, tokenizer, manifests,
run summaries; a crash or a full disk mid-write leaves the previous file, never a half-written one under
the final name) and file hashing (cache validation, the data identity a checkpoint records)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `path` for binary writing through a temporary file in the same directory.

    On a clean exit the data is flushed, fsynced and moved over `path` with `os.replace` (atomic on
    POSIX because both names are on one filesystem); on an exception the temporary file is deleted
    and `path` is left as it was. The parent directory must exist.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 (not mkstemp's 0o600) so the final file gets the usual umask-based
    # permissions; O_EXCL because the name must be ours alone.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically; numpy scalars and paths are written as plain values."""
    def plain(o):
        if hasattr(o, "item") and callable(o.item):       # numpy / torch scalars
            return o.item()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2, default=plain).encode())
