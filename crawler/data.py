"""Token data: FineWeb-format shard I/O (SPEC §6), the rank-aware training stream (SPEC §2), validation
tokens, and the built-in corpus (DESIGN "The built-in corpus") that gives every Python installation a
small train/val set and tokenizer without downloads.

Shard format: a header of 256 little-endian int32 (`[0] = 20240520` magic, `[1] = 1` version,
`[2] = n_tokens`, rest zero) followed by `n_tokens` little-endian uint16 ids; file size `1024 + 2n`.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
import torch

from crawler.fileio import atomic_open, file_sha256
from crawler.tokenizer import BOS_ID, train_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")


# --------------------------------------------------------------------------------------------------
# Shard I/O

def _shard_length(path: Path) -> int:
    """Validate the header and file size of a shard and return its token count."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {str(path)!r} does not exist") from None
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"shard {str(path)!r}: file is {size} bytes, shorter than the "
                         f"{HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype=_HEADER_DTYPE)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"shard {str(path)!r}: bad magic {int(header[0])} (expected {SHARD_MAGIC}); "
                         f"not a FineWeb token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"shard {str(path)!r}: unsupported version {int(header[1])} "
                         f"(expected {SHARD_VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        problem = "truncated" if size < expected else "trailing bytes"
        raise ValueError(f"shard {str(path)!r}: size mismatch ({problem}): header says {n} tokens, "
                         f"so {expected} bytes, but the file is {size} bytes")
    return n


def _read_shard_np(path: Path) -> np.ndarray:
    """A validated shard's tokens as a native-endian uint16 numpy array."""
    n = _shard_length(path)
    tokens = np.fromfile(path, dtype=_TOKEN_DTYPE, count=n, offset=HEADER_BYTES)
    return tokens.astype(np.uint16, copy=False)


def read_shard(path: str | os.PathLike) -> torch.Tensor:
    """Read a FineWeb-format shard: returns a 1-D torch.uint16 tensor of its n_tokens ids.

    Raises FileNotFoundError for a missing file and ValueError (naming the file and the problem) for a
    file shorter than the header, a bad magic, an unsupported version, or a size that disagrees with
    the header's token count (truncated file or trailing bytes).
    """
    return torch.from_numpy(_read_shard_np(Path(path)))


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

    Raises FileNotFoundError naming the directory and the pattern when the directory is missing or no
    file matches.
    """
    data_dir = Path(data_dir)
    pattern = f"fineweb_{split}_*.bin"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist (looking for {pattern})")
    paths = sorted(data_dir.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shards matching {pattern!r} in {str(data_dir)!r}")
    return paths


def load_validation_tokens(data_dir: str | os.PathLike) -> torch.Tensor:
    """All validation tokens of `data_dir` (its `fineweb_val_*.bin` shards in sorted order),
    concatenated: a 1-D torch.uint16 tensor, kept compact (FineWeb's val split is ~62M tokens); cast
    windows to int64 before indexing with them. Not truncated: evaluation trims to its window size."""
    return torch.from_numpy(np.concatenate([_read_shard_np(p) for p in list_shards(data_dir, "val")]))


# --------------------------------------------------------------------------------------------------
# Training stream

class DistributedTokenLoader:
    """The sequential training stream of SPEC §2 over the sorted `fineweb_train_*.bin` shards of
    `data_dir`, wrapping around at the end.

    Every rank constructs it with the same data and advances it identically; each `next_batch` call
    consumes `(local_tokens + 1) * world_size` contiguous tokens (across shard boundaries) and rank `r`
    keeps span `r`. Only the shard being read is held in memory. `state_dict()` / `load_state_dict()`
    capture the position (shard index + offset) so a resumed run sees exactly the same batches.
    """

    def __init__(self, data_dir: str | os.PathLike, *, rank: int = 0, world_size: int = 1):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.files = list_shards(data_dir, "train")
        # Validating every header up front turns a corrupt shard into an error at start-up, not hours
        # into a run; the lengths also let the stream skip other ranks' spans without reading them.
        self._lengths = [_shard_length(p) for p in self.files]
        if sum(self._lengths) == 0:
            raise ValueError(f"train shards in {str(Path(data_dir))!r} hold no tokens")
        self._shard, self._offset = 0, 0
        self._loaded_index, self._loaded = -1, None

    def _tokens(self) -> np.ndarray:
        if self._loaded_index != self._shard:
            self._loaded = None  # drop the previous shard before reading the next one
            self._loaded = _read_shard_np(self.files[self._shard])
            self._loaded_index = self._shard
        return self._loaded

    def _advance(self, n: int, out: np.ndarray | None = None) -> None:
        """Move the stream `n` tokens forward, copying them into `out` when given."""
        done = 0
        while done < n:
            if self._offset >= self._lengths[self._shard]:
                self._shard, self._offset = (self._shard + 1) % len(self.files), 0
                continue
            k = min(n - done, self._lengths[self._shard] - self._offset)
            if out is not None:
                out[done:done + k] = self._tokens()[self._offset:self._offset + k]
            self._offset += k
            done += k

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y): int64 CPU tensors of shape (local_tokens // seq_len, seq_len), with
        y the next-token targets of x (y[i, j] = the token after x[i, j] in the stream)."""
        if not (isinstance(seq_len, int) and seq_len > 0 and isinstance(local_tokens, int)
                and local_tokens > 0 and local_tokens % seq_len == 0):
            raise ValueError(f"local_tokens must be a positive multiple of seq_len, got "
                             f"local_tokens={local_tokens}, seq_len={seq_len}")
        span = local_tokens + 1
        buf = np.empty(span, dtype=np.uint16)
        self._advance(self.rank * span)
        self._advance(span, buf)
        self._advance((self.world_size - 1 - self.rank) * span)
        t = torch.from_numpy(buf.astype(np.int64))
        return t[:-1].view(-1, seq_len), t[1:].view(-1, seq_len)

    def state_dict(self) -> dict:
        """The stream position: {"shard": index into the sorted shards, "offset": tokens into it,
        "shards": the shard file names (checked on load)}. Same on every rank."""
        return {"shard": self._shard, "offset": self._offset, "shards": [p.name for p in self.files]}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a position from `state_dict()`. Raises ValueError if the shard list differs or the
        position is outside it (the checkpoint belongs to other data)."""
        names = [p.name for p in self.files]
        if list(state["shards"]) != names:
            raise ValueError(f"loader state was saved over shards {list(state['shards'])}, "
                             f"but the data directory has {names}")
        shard, offset = int(state["shard"]), int(state["offset"])
        if not (0 <= shard < len(names) and 0 <= offset <= self._lengths[shard]):
            raise ValueError(f"loader state position (shard {shard}, offset {offset}) is outside the data")
        self._shard, self._offset = shard, offset


# --------------------------------------------------------------------------------------------------
# The built-in corpus

CORPUS_FORMAT_VERSION = 1
# Every VAL_EVERY-th document goes to val: a quarter of the text, ~220k tokens at vocab 1024, enough
# for a stable val_bpb; the built-in corpus (~0.9M tokens) cannot spare more for training.
VAL_EVERY = 4
MIN_DOC_CHARS = 200  # a lone one-line docstring carries too little context to be a document
SHARD_TOKENS = 100_000_000  # FineWeb's shard size
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
    """Where the built-in corpus lives and how big it is. Byte counts are UTF-8 bytes of the source
    documents; token counts include one BOS per document."""
    data_dir: Path
    tokenizer_path: Path
    vocab_size: int
    train_documents: int
    val_documents: int
    train_tokens: int
    val_tokens: int
    train_bytes: int
    val_bytes: int
    built: bool  # True when this call built the corpus, False when it reused a valid cache


def default_cache_dir() -> Path:
    """$CRAWLER_CACHE if set, else $XDG_CACHE_HOME (default ~/.cache)/crawler-kernels/corpus."""
    if os.environ.get("CRAWLER_CACHE"):
        return Path(os.environ["CRAWLER_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "crawler-kernels" / "corpus"


def _stdlib_sources() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the stdlib's .py files, sorted, minus third-party and test code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _docstrings(source: bytes) -> list[str]:
    """Module, class and function docstrings of a source file in source order ([] if it won't parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old modules trigger SyntaxWarnings (invalid escapes)
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def builtin_documents(max_documents: int | None = None) -> Iterator[str]:
    """The built-in corpus's documents (str), in a fixed order: every `pydoc_data.topics` topic (sorted
    by name), then one document per stdlib source file holding its docstrings. Documents under
    MIN_DOC_CHARS are dropped. Nothing is imported but the `pydoc_data.topics` data module (importing
    arbitrary stdlib modules has side effects). Stops after `max_documents` when given."""
    from pydoc_data.topics import topics

    def all_docs() -> Iterator[str]:
        for name in sorted(topics):
            yield topics[name].strip()
        for _, path in _stdlib_sources():
            yield "\n\n".join(_docstrings(path.read_bytes()))

    count = 0
    for doc in all_docs():
        if max_documents is not None and count >= max_documents:
            return
        if len(doc) >= MIN_DOC_CHARS:
            count += 1
            yield doc


def _sources_sha256() -> str:
    """Hash of everything the corpus is made from: the cache key, cheap compared with re-extracting."""
    from pydoc_data.topics import topics
    h = hashlib.sha256()
    h.update(json.dumps(topics, sort_keys=True).encode())
    for rel, path in _stdlib_sources():
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _cache_key(vocab_size: int, max_documents: int | None) -> dict:
    # Everything that determines the cache's bytes: the code's format, the inputs, the tokenizer trainer.
    return {"format_version": CORPUS_FORMAT_VERSION, "python": sys.version, "sentencepiece": spm.__version__,
            "sources_sha256": _sources_sha256(), "vocab_size": vocab_size, "max_documents": max_documents,
            "val_every": VAL_EVERY, "min_doc_chars": MIN_DOC_CHARS}


def _load_valid_cache(data_dir: Path, key: dict) -> CorpusInfo | None:
    """The cached corpus if its manifest matches `key` and every file hashes as recorded, else None."""
    try:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        if manifest.get("key") != key:
            return None
        files = manifest["files"]
        present = {p.name for p in data_dir.glob("fineweb_*.bin")} | {"tokenizer.model"}
        if present != set(files):
            return None
        for name, digest in files.items():
            if file_sha256(data_dir / name) != digest:
                return None
        c = manifest["counts"]
        return CorpusInfo(data_dir=data_dir, tokenizer_path=data_dir / "tokenizer.model",
                          vocab_size=manifest["tokenizer_vocab_size"], built=False, **c)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_split(out_dir: Path, split: str, docs: list[str], sp: spm.SentencePieceProcessor) -> int:
    """Encode docs as [BOS] + ids, write them as shards of at most SHARD_TOKENS; return the token count."""
    tokens = np.fromiter((t for ids in sp.encode(docs) for t in (BOS_ID, *ids)), dtype=np.int64)
    for i, start in enumerate(range(0, len(tokens), SHARD_TOKENS)):
        write_shard(out_dir / f"fineweb_{split}_{i:06d}.bin", tokens[start:start + SHARD_TOKENS])
    return len(tokens)


def _build(out_dir: Path, key: dict, vocab_size: int, max_documents: int | None,
           log: Callable[[str], None]) -> CorpusInfo:
    log(f"built-in corpus: gathering pydoc topics and docstrings from {sysconfig.get_paths()['stdlib']}")
    docs = list(builtin_documents(max_documents))
    val = docs[VAL_EVERY - 1::VAL_EVERY]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    if not val:
        raise ValueError(f"built-in corpus: {len(docs)} documents is too few for a val split "
                         f"(every {VAL_EVERY}th document)")
    log(f"built-in corpus: {len(docs)} documents ({len(train)} train, {len(val)} val); "
        f"training a {vocab_size}-piece BPE tokenizer")
    sp = train_tokenizer(train, out_dir / "tokenizer.model", vocab_size)
    log("built-in corpus: encoding and writing shards")
    corpus_hash = hashlib.sha256()
    for d in docs:
        corpus_hash.update(d.encode() + b"\0")
    counts = {"train_documents": len(train), "val_documents": len(val),
              "train_tokens": _write_split(out_dir, "train", train, sp),
              "val_tokens": _write_split(out_dir, "val", val, sp),
              "train_bytes": sum(len(d.encode()) for d in train),
              "val_bytes": sum(len(d.encode()) for d in val)}
    files = {p.name: file_sha256(p) for p in sorted(out_dir.iterdir())}
    manifest = {"key": key, "corpus_sha256": corpus_hash.hexdigest(), "tokenizer_vocab_size": sp.vocab_size(),
                "counts": counts, "files": files}
    with atomic_open(out_dir / "manifest.json") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
    return CorpusInfo(data_dir=out_dir, tokenizer_path=out_dir / "tokenizer.model",
                      vocab_size=sp.vocab_size(), built=True, **counts)


def build_builtin_corpus(cache_dir: str | os.PathLike | None = None, vocab_size: int = 1024,
                         log: Callable[[str], None] = print, *, max_documents: int | None = None) -> CorpusInfo:
    """Build (or reuse) the built-in corpus: a `vocab_size` BPE tokenizer trained on the train split and
    FineWeb-format `fineweb_{train,val}_*.bin` shards, in `cache_dir/sp{vocab_size}[_n{max_documents}]`
    (cache_dir defaults to `default_cache_dir()`). `max_documents` keeps only the first documents
    (quick tests). Deterministic: the same Python, sentencepiece and arguments give identical files.

    The cache is reused when its manifest matches (format, Python, sentencepiece, sources hash,
    arguments) and every file hashes as recorded; otherwise it is rebuilt in a temporary directory
    that replaces the old one only when complete. Returns a CorpusInfo; progress goes to `log`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    name = f"sp{vocab_size}" + (f"_n{max_documents}" if max_documents is not None else "")
    target = cache_dir / name
    key = _cache_key(vocab_size, max_documents)
    info = _load_valid_cache(target, key)
    if info is None:
        if target.exists():
            log(f"built-in corpus: cache {target} is stale or corrupt; rebuilding")
        t0 = time.perf_counter()
        cache_dir.mkdir(parents=True, exist_ok=True)
        # os.mkdir, not mkdtemp (mode 0700): the finished directory keeps umask-based permissions.
        tmp = cache_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        os.mkdir(tmp)
        try:
            built = _build(tmp, key, vocab_size, max_documents, log)
            # Another process may have finished the same build meanwhile: keep whichever is valid.
            info = _load_valid_cache(target, key)
            if info is None:
                old = cache_dir / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.old"
                if target.exists():
                    os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
                info = dataclasses.replace(built, data_dir=target, tokenizer_path=target / "tokenizer.model")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built-in corpus: built in {time.perf_counter() - t0:.1f}s")
    else:
        log(f"built-in corpus: reusing {target}")
    log(f"built-in corpus: train {info.train_documents} docs, {info.train_tokens:,} tokens, "
        f"{info.train_bytes:,} bytes; val {info.val_documents} docs, {info.val_tokens:,} tokens, "
        f"{info.val_bytes:,} bytes; vocab {info.vocab_size}; in {target}")
    return info
