"""File helpers shared across the package: atomic output for every writer (checkpoints, artifacts, shards,
tokenizer, manifests, run summaries; a crash or a full disk mid-write leaves the previous file, never a
half-written one under the final name), the checks an output path gets before a run spends time on it,
and file hashing (cache validation, the data and tokenizer identity a checkpoint records).

A write that fails (disk full, read-only, no permission) raises `WriteError`, a SetupError whose message
says which file, why, and that the previous file is intact. A write killed before it finished leaves its
temporary file `.<name>.<pid>.<hex>.tmp`; the next write of the same file, and `prepare_output_dir`,
remove such files whose process is gone (only this pattern, never another file).

A directory a run writes into is held by one process at a time (`hold_directory_lock`): an exclusive
`fcntl.flock` on the lock file LOCK_NAME inside it, taken before the directory is checked and held until
the run ends. A second process on the same directory fails at once with a SetupError naming the holder's
PID; a lock left by a killed process never blocks (the operating system releases it with the process).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import SetupError

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
LOCK_NAME = ".crawler.lock"      # the lock file of hold_directory_lock, inside the directory it locks


class WriteError(SetupError):
    """A file could not be written (disk full, read-only, no permission, missing directory); the message
    names the file and says that the file previously under that name is unchanged."""


def _reason(e: OSError) -> str:
    """The plain-words cause of a failed write and what to do about it."""
    text = e.strerror or str(e)
    if e.errno in _NO_SPACE:
        return f"{text}: the disk (or the file size limit) is full; free space and run again"
    if e.errno in _NO_PERMISSION:
        return f"{text}: the location is read-only or not writable by this user; choose another one"
    if e.errno == errno.ENOENT:
        return f"{text}: its directory does not exist"
    return text


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Delete the temporary files of killed atomic writes in `directory` (of `target` only, when given):
    names matching `.<name>.<pid>.<hex>.tmp` whose process no longer runs. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        if m is None or (target is not None and m["target"] != target) or _process_alive(int(m["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(directory) / name)
            removed.append(Path(directory) / name)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open `path` for binary writing through a temporary file in the same directory.

    On a clean exit the data is flushed, fsynced and moved over `path` with `os.replace` (atomic on
    POSIX because both names are on one filesystem); on an exception the temporary file is deleted
    and `path` is left as it was. The parent directory must exist. Stale temporary files of earlier,
    killed writes of `path` are removed first. Raises WriteError for an operating-system failure (disk
    full, read-only, permissions); other exceptions from the block propagate unchanged.
    """
    path = Path(path)
    remove_stale_temps(path.parent, path.name)
    tmp = _temp_name(path)
    try:
        # os.open with mode 0o666 (not mkstemp's 0o600) so the final file gets the usual umask-based
        # permissions; O_EXCL because the name must be ours alone.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise WriteError(f"cannot write {str(path)!r}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise WriteError(f"could not write {str(path)!r}: {_reason(e)} ({kept})") from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (atomic_open); WriteError when it cannot be written."""
    with atomic_open(path) as f:
        f.write(data)


def check_writable_file(path: str | os.PathLike, what: str) -> Path:
    """Check, before a run does the work, that the output file `path` (command-line argument `what`,
    e.g. "--out") can be written: its directory exists and is writable and `path` is not a directory.
    Returns the path; SetupError saying what to change otherwise."""
    path = Path(path)
    if path.is_dir():
        raise SetupError(f"{what} {str(path)!r} is a directory: give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise SetupError(f"{what} {str(path)!r}: directory {str(parent)!r} does not exist: create it first")
    _probe_write(parent, what)
    return path


def _probe_write(directory: Path, what: str) -> None:
    """Create and remove an empty file in `directory` (under atomic_open's temporary-name pattern, so a
    killed probe is cleaned up like a killed write): a read-only location is found before the work."""
    probe = _temp_name(directory / "write-probe")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise SetupError(f"{what}: cannot write in {str(directory)!r}: {_reason(e)}") from None
    os.unlink(probe)


def _make_dir(directory: str | os.PathLike, what: str) -> Path:
    """`directory`, created with its parents if missing; SetupError if it is a file or cannot be created."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SetupError(f"{what} {str(directory)!r} is a file, not a directory: choose a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"{what} {str(directory)!r} cannot be created: {_reason(e)}") from None
    return directory


def _lock_holder(fd: int) -> str:
    """The holder's PID as its lock file records it, in words ("PID 1234"), for the refusal message."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"PID {text}" if text.isdigit() else "a process that has not yet recorded its PID"


@contextlib.contextmanager
def hold_directory_lock(directory: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold `directory` (command-line argument `what`, e.g. "--out-dir") for this process while the
    block runs: created if missing, then an exclusive, non-blocking `fcntl.flock` on its lock file
    LOCK_NAME, which records this process's PID. Take it before checking what the directory holds, and
    keep it while writing there, so no two processes check, then write, the same directory.

    Another process holding it: SetupError at once, naming the directory and the holder's PID (nothing
    waits). A holder that died released the lock with its process, so its leftover lock file never
    blocks. On exit the lock file is removed and the lock released. flock locks belong to an open file,
    so a second hold of the same directory in the same process is refused too. Yields the directory."""
    directory = _make_dir(directory, what)
    path = directory / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise SetupError(f"{what}: cannot create the lock file {str(path)!r}: {_reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise SetupError(f"{what} {str(directory)!r} is in use by another run ({holder} holds "
                             f"{LOCK_NAME}): wait for it to end, or choose another {what}") from None
        # A holder that released between our open and our flock removed the file first: the lock we got
        # is on a name nobody else sees, so take it again on the file the path names now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield directory
    finally:
        # Removed while still locked, so a process that opened it meanwhile sees the name gone and retries.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def prepare_output_dir(directory: str | os.PathLike, what: str, *, outputs: Iterable[str] = (),
                       replace: bool = False, hint: str = "") -> Path:
    """Make `directory` ready to receive a run's `outputs` (file names), before the run starts: created
    if missing, refused if it is a file or not writable, stale temporary files of killed writes removed.
    If it already holds one of `outputs`, SetupError unless `replace`, in which case those files are
    deleted (so no output of the earlier run is mistaken for one of the new run). `what` names the
    command-line argument in the messages, `hint` says what to do about an existing run."""
    directory = _make_dir(directory, what)
    _probe_write(directory, what)
    remove_stale_temps(directory)
    existing = [name for name in outputs if (directory / name).exists()]
    if existing and not replace:
        raise SetupError(f"{what} {str(directory)!r} already holds a run ({', '.join(existing)})"
                         + (f": {hint}" if hint else ""))
    for name in existing:
        os.unlink(directory / name)
    return directory


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
    write_bytes(path, json.dumps(obj, indent=2, default=plain).encode())
