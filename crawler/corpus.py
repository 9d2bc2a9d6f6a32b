"""The built-in corpus: a small train/val set and tokenizer that every Python installation can build
without downloads. Documents are the stdlib's own documentation text (`pydoc_data.topics` and the
docstrings of the stdlib sources), in a fixed order; a SentencePiece BPE is trained on the train split
and both splits are written as FineWeb-format shards (crawler.data) into a cache directory, validated
by a manifest of hashes. The same code path then serves real FineWeb shards unchanged.

Only for runs without a data directory: an exported train_gpt.py, which always reads the challenge's
data, does not carry it (crawler.budget.NOT_EXPORTED).
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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .data import write_shard
from .fileio import atomic_open, file_sha256
from .tokenizer import BOS_ID, TOKENIZER_FILE, train_tokenizer

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
        present = {p.name for p in data_dir.glob("fineweb_*.bin")} | {TOKENIZER_FILE}
        if present != set(files):
            return None
        for name, digest in files.items():
            if file_sha256(data_dir / name) != digest:
                return None
        c = manifest["counts"]
        return CorpusInfo(data_dir=data_dir, tokenizer_path=data_dir / TOKENIZER_FILE,
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
    sp = train_tokenizer(train, out_dir / TOKENIZER_FILE, vocab_size)
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
    return CorpusInfo(data_dir=out_dir, tokenizer_path=out_dir / TOKENIZER_FILE,
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
                info = dataclasses.replace(built, data_dir=target, tokenizer_path=target / TOKENIZER_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built-in corpus: built in {time.perf_counter() - t0:.1f}s")
    else:
        log(f"built-in corpus: reusing {target}")
    log(f"built-in corpus: train {info.train_documents} docs, {info.train_tokens:,} tokens, "
        f"{info.train_bytes:,} bytes; val {info.val_documents} docs, {info.val_tokens:,} tokens, "
        f"{info.val_bytes:,} bytes; vocab {info.vocab_size}; in {target}")
    return info
