"""Data: shard format and its corrupt-file errors, atomic writes, the docs/math.md §2 train stream (spans,
wrap-around, ranks, resume), validation tokens, and the cached, deterministic built-in corpus."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from crawler.corpus import build_builtin_corpus, default_cache_dir
from crawler.data import HEADER_BYTES, list_shards, load_validation_tokens, read_shard, write_shard
from crawler.fileio import atomic_open
from crawler.tokenizer import BOS_ID, load_tokenizer
from crawler.training.stream import DistributedTokenLoader

# ------------------------------------------------------------------------------------------------
# Shard format

def test_shard_round_trip(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = np.array([0, 1, 2, 65535, 40000, 7], dtype=np.int64)
    write_shard(path, torch.from_numpy(tokens))
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, len(tokens)] and not header[3:].any()
    out = read_shard(path)
    assert out.dtype == torch.uint16 and out.shape == (len(tokens),)
    assert out.to(torch.int64).tolist() == tokens.tolist()
    # Explicitly little-endian on disk.
    assert path.read_bytes()[HEADER_BYTES + 6:HEADER_BYTES + 8] == (65535).to_bytes(2, "little")


def test_shard_round_trip_empty_and_lists(tmp_path):
    write_shard(tmp_path / "a.bin", [])
    assert read_shard(tmp_path / "a.bin").numel() == 0
    write_shard(tmp_path / "b.bin", [5, 6])
    assert read_shard(tmp_path / "b.bin").tolist() == [5, 6]


@pytest.mark.parametrize("tokens, err, match", [
    ([0, 65536], ValueError, "65535"),
    ([-1, 3], ValueError, "65535"),
    (np.zeros((2, 2), dtype=np.int64), ValueError, "1-D"),
    (np.array([1.0, 2.0]), TypeError, "integers"),
])
def test_write_shard_rejects_bad_tokens(tmp_path, tokens, err, match):
    path = tmp_path / "x.bin"
    write_shard(path, [9])
    with pytest.raises(err, match=match):
        write_shard(path, tokens)
    assert read_shard(path).tolist() == [9]  # the previous file is intact


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half-written")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def _corrupt(path, kind):
    data = bytearray(path.read_bytes())
    if kind == "magic":
        data[0:4] = (12345).to_bytes(4, "little")
    elif kind == "version":
        data[4:8] = (2).to_bytes(4, "little")
    elif kind == "truncated":
        data = data[:-3]
    elif kind == "trailing":
        data += b"\x00\x00"
    elif kind == "short":
        data = data[:100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, match", [
    ("magic", "bad magic 12345"),
    ("version", "unsupported version 2"),
    ("truncated", r"size mismatch \(truncated\)"),
    ("trailing", r"size mismatch \(trailing bytes\)"),
    ("short", "shorter than the 1024-byte header"),
])
def test_corrupt_shard_errors_name_file_and_problem(tmp_path, kind, match):
    path = tmp_path / "fineweb_val_000003.bin"
    write_shard(path, np.arange(50))
    _corrupt(path, kind)
    with pytest.raises(ValueError, match=match) as e:
        read_shard(path)
    assert "fineweb_val_000003.bin" in str(e.value)


def test_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        read_shard(tmp_path / "gone.bin")


def test_list_shards(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [i])
    write_shard(tmp_path / "fineweb_val_000000.bin", [9])
    assert [p.name for p in list_shards(tmp_path, "train")] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    with pytest.raises(FileNotFoundError, match=r"fineweb_test_\*\.bin.*" + tmp_path.name):
        list_shards(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="missing.*does not exist.*fineweb_train_"):
        list_shards(tmp_path / "missing", "train")


def test_load_validation_tokens(tmp_path):
    write_shard(tmp_path / "fineweb_val_000001.bin", [3, 4])
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    write_shard(tmp_path / "fineweb_train_000000.bin", [7])
    val = load_validation_tokens(tmp_path)
    assert val.dtype == torch.uint16 and val.to(torch.int64).tolist() == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# Train stream

LENGTHS = (10, 7, 13, 0, 5)  # an empty shard too: the stream must step over it


@pytest.fixture
def stream_dir(tmp_path):
    """Train shards whose tokens are their positions in the concatenated stream (so spans are legible)."""
    start = 0
    for i, n in enumerate(LENGTHS):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", np.arange(start, start + n))
        start += n
    return tmp_path


def expected_span(step, rank, world, local):
    total = sum(LENGTHS)
    span = local + 1
    begin = step * span * world + rank * span
    return np.arange(begin, begin + span) % total


@pytest.mark.parametrize("world, local, seq", [(1, 4, 2), (3, 6, 3), (2, 12, 4)])
def test_loader_spans_ranks_and_wrap(stream_dir, world, local, seq):
    loaders = [DistributedTokenLoader(stream_dir, rank=r, world_size=world) for r in range(world)]
    total = sum(LENGTHS)
    steps = 2 * total // ((local + 1) * world) + 2  # wraps around the stream at least twice
    for step in range(steps):
        seen = []
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch(local, seq)
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (local // seq, seq)
            span = expected_span(step, r, world, local)
            assert x.flatten().tolist() == span[:-1].tolist()
            assert y.flatten().tolist() == span[1:].tolist()
            seen.append(span)
        # Ranks read consecutive, disjoint spans of one chunk.
        chunk = np.concatenate(seen)
        assert (np.diff(chunk) % total == 1).all()


def test_loader_resume_is_exact(stream_dir):
    loader = DistributedTokenLoader(stream_dir, rank=1, world_size=2)
    for _ in range(5):
        loader.next_batch(4, 2)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    expected = [loader.next_batch(4, 2) for _ in range(6)]
    resumed = DistributedTokenLoader(stream_dir, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch(4, 2) for _ in range(6)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_loader_rejects_foreign_state(stream_dir):
    loader = DistributedTokenLoader(stream_dir)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="saved over shards"):
        loader.load_state_dict({**state, "shards": ["fineweb_train_000000.bin"]})
    with pytest.raises(ValueError, match="outside the data"):
        loader.load_state_dict({**state, "offset": 11})


@pytest.mark.parametrize("local, seq", [(10, 3), (8, 0), (0, 4), (-4, 2)])
def test_loader_bad_sizes(stream_dir, local, seq):
    with pytest.raises(ValueError, match="positive multiple of seq_len"):
        DistributedTokenLoader(stream_dir).next_batch(local, seq)


def test_loader_bad_rank_and_corrupt_shard(stream_dir):
    with pytest.raises(ValueError, match="rank"):
        DistributedTokenLoader(stream_dir, rank=2, world_size=2)
    _corrupt(stream_dir / "fineweb_train_000002.bin", "truncated")
    with pytest.raises(ValueError, match="fineweb_train_000002.bin.*truncated"):
        DistributedTokenLoader(stream_dir)


# ------------------------------------------------------------------------------------------------
# Built-in corpus

CORPUS_ARGS = dict(vocab_size=400, max_documents=40)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_builtin_corpus_build_reuse_and_rebuild(tmp_path):
    logs = []
    info = build_builtin_corpus(tmp_path / "a", log=logs.append, **CORPUS_ARGS)
    assert info.built and info.vocab_size == 400
    assert info.train_documents + info.val_documents == 40 and info.val_documents == 10
    assert any("tokens" in line and "bytes" in line for line in logs)
    train = torch.cat([read_shard(p) for p in list_shards(info.data_dir, "train")]).to(torch.int64)
    val = load_validation_tokens(info.data_dir).to(torch.int64)
    assert (len(train), len(val)) == (info.train_tokens, info.val_tokens)
    # Every document starts with BOS, and nothing else is BOS.
    assert train[0] == BOS_ID and int((train == BOS_ID).sum()) == info.train_documents
    assert val[0] == BOS_ID and int((val == BOS_ID).sum()) == info.val_documents
    assert int(train.max()) < 400
    assert load_tokenizer(info.tokenizer_path).vocab_size() == 400
    assert info.train_bytes > info.train_tokens > 0 and info.val_bytes > info.val_tokens > 0
    original = _files(info.data_dir)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")], "temp dir left behind"

    # An independent build is byte-identical (tokenizer, shards and manifest).
    other = build_builtin_corpus(tmp_path / "b", log=lambda s: None, **CORPUS_ARGS)
    assert _files(other.data_dir) == original

    # A valid cache is reused as it is.
    again = build_builtin_corpus(tmp_path / "a", log=lambda s: None, **CORPUS_ARGS)
    assert not again.built and again == dataclasses.replace(info, built=False)

    # A corrupted shard (same size, so only its hash tells) triggers a rebuild that restores it.
    shard = info.data_dir / "fineweb_train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[HEADER_BYTES + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    logs.clear()
    rebuilt = build_builtin_corpus(tmp_path / "a", log=logs.append, **CORPUS_ARGS)
    assert rebuilt.built and any("stale or corrupt" in line for line in logs)
    assert _files(rebuilt.data_dir) == original

    # So does a missing tokenizer.
    info.tokenizer_path.unlink()
    assert build_builtin_corpus(tmp_path / "a", log=lambda s: None, **CORPUS_ARGS).built
    assert _files(info.data_dir) == original


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CRAWLER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CRAWLER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "crawler-kernels" / "corpus"
