"""SentencePiece tokenizers: loading with clear errors, deterministic BPE training with parameter-golf's
options, the byte look-up tables that turn per-token losses into bits per byte (docs/math.md §6), and
the checks that a tokenizer fits a model: its size against the vocabulary (`check_vocab`) and its
identity (size + SHA-256, `tokenizer_identity`) against the one the model was trained with, which
checkpoints and artifacts record (`load_checked_tokenizer`, the one place both are decided)."""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import torch

from crawler.errors import MissingFileError, SetupError
from crawler.fileio import atomic_open, file_sha256

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"    # a data directory's own tokenizer (parameter-golf's layout, ours too)

# parameter-golf's tokenizer options (pg_spec §1.5). add_dummy_prefix=False: a document's first word
# gets no invented leading space, so the byte count of the text is not inflated.
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nfkc",
    add_dummy_prefix=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    character_coverage=0.9995,
    # One thread: multi-threaded BPE merges may break frequency ties in a different order run to run.
    num_threads=1,
    # Sentences are lines; docstring lines are short, but a long line must not be silently dropped.
    max_sentence_length=16384,
    # Bounds training time and memory on a large corpus; sampling beyond it is seeded (below).
    input_sentence_size=2_000_000,
    shuffle_input_sentence=True,
    minloglevel=2,
)
_SAMPLING_SEED = 1234


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file.

    Raises MissingFileError (a FileNotFoundError) when `path` does not exist and SetupError (a
    ValueError) when it is not a readable SentencePiece model (both name the file).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"tokenizer model {str(path)!r} does not exist")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(path.read_bytes())
    except (RuntimeError, OSError) as e:
        raise SetupError(f"{str(path)!r} is not a valid SentencePiece model: {e}") from None
    return sp


def _lines(documents: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on "sentences"; a line is the natural unit of docstring text.
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(documents: Iterable[str], model_path: str | os.PathLike,
                    vocab_size: int) -> spm.SentencePieceProcessor:
    """Train a byte-fallback BPE SentencePiece model on `documents` (an iterable of str) and write it
    atomically to `model_path`.

    Ids: pad 0, bos 1, eos 2, unk 3, then 256 byte-fallback pieces, then merges; `vocab_size` is exact
    (ValueError if the text cannot fill it). The same documents give a byte-identical model file.
    Returns the trained processor.
    """
    # 4 specials + 256 byte pieces must fit, and ids are stored as uint16 in shards.
    if not 260 < vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in (260, 65536] (4 special + 256 byte pieces, uint16 ids), "
                         f"got {vocab_size}")
    spm.set_random_generator_seed(_SAMPLING_SEED)
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_lines(documents), model_writer=proto,
                                       vocab_size=vocab_size, **_TRAINER_OPTIONS)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for vocab_size={vocab_size}: {e}") from None
    with atomic_open(model_path) as f:
        f.write(proto.getvalue())
    return load_tokenizer(model_path)


def check_vocab(sp: spm.SentencePieceProcessor, vocab_size: int, *, allow_smaller: bool = False) -> None:
    """SetupError unless the tokenizer has exactly `vocab_size` pieces. More pieces can never work (ids
    >= vocab_size would index past the embedding); fewer is refused unless `allow_smaller` (a model
    padded past its tokenizer: the extra ids are never data, and score 0 bytes if they were)."""
    n = sp.vocab_size()
    if n > vocab_size:
        raise SetupError(f"tokenizer has {n} pieces but the model's vocab_size is {vocab_size}: ids >= "
                         f"{vocab_size} would index past the embedding; use a model with vocab_size >= {n} "
                         f"or a smaller tokenizer")
    if n < vocab_size and not allow_smaller:
        raise SetupError(f"tokenizer has {n} pieces but the model's vocab_size is {vocab_size}: it is probably "
                         f"not the tokenizer the model's data was encoded with; use that one, or pass "
                         f"--allow-tokenizer-mismatch if the model's vocabulary is deliberately larger")


def tokenizer_identity(path: str | os.PathLike, sp: spm.SentencePieceProcessor) -> dict:
    """{"sha256": hex SHA-256 of the model file, "vocab_size": its piece count}: what checkpoints and
    artifacts record of the tokenizer their weights were trained with."""
    return {"sha256": file_sha256(path), "vocab_size": sp.vocab_size()}


def load_checked_tokenizer(path: str | os.PathLike, vocab_size: int, *, trained_with: dict | None = None,
                           allow_mismatch: bool = False) -> tuple[spm.SentencePieceProcessor, dict]:
    """Load the tokenizer at `path` for a model of `vocab_size` and check it, once per run: its size
    (`check_vocab`; a smaller one is accepted with `allow_mismatch`) and, when the model records the
    identity of the tokenizer it was trained with (`trained_with`, see tokenizer_identity), that this
    is the same file (another one is accepted with `allow_mismatch`: a deliberate change). Returns
    (processor, identity). Raises MissingFileError / SetupError naming the file and what to do."""
    sp = load_tokenizer(path)
    check_vocab(sp, vocab_size, allow_smaller=allow_mismatch)
    identity = tokenizer_identity(path, sp)
    check_tokenizer_identity(path, identity, trained_with, allow_mismatch=allow_mismatch)
    return sp, identity


def check_tokenizer_identity(path: str | os.PathLike, identity: dict, trained_with: dict | None, *,
                             allow_mismatch: bool = False, source: str = "the model") -> None:
    """SetupError unless the tokenizer at `path`, of `identity` (tokenizer_identity), is the one `source`
    (the weights entering the run, e.g. "--init-from 'w.pt'") records it was trained with: `trained_with`
    (None: nothing recorded, nothing to check); another one is accepted with `allow_mismatch` (a
    deliberate change). The one comparison of `load_checked_tokenizer` and of every weight file a run
    starts from."""
    if trained_with is not None and identity != trained_with and not allow_mismatch:
        raise SetupError(f"tokenizer {str(path)!r} ({identity['vocab_size']} pieces, sha256 "
                         f"{identity['sha256'][:12]}) is not the one {source} was trained with "
                         f"({trained_with['vocab_size']} pieces, sha256 {trained_with['sha256'][:12]}): pass "
                         f"the training run's tokenizer (--tokenizer), or --allow-tokenizer-mismatch for a "
                         f"deliberate change")


def byte_luts(sp: spm.SentencePieceProcessor,
              vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Byte look-up tables for bits-per-byte (docs/math.md §6), each of length L = max(sp.vocab_size(), vocab_size).

    Returns (base_bytes int16 (L,), has_leading_space bool (L,), is_boundary bool (L,)):
    control / unknown / unused ids and table padding (ids >= sp.vocab_size()) -> 0 bytes, boundary;
    byte-fallback ids -> 1 byte; any other piece -> UTF-8 length after dropping a leading "▁", which
    sets has_leading_space. A target y after token x costs
    `base_bytes[y] + (has_leading_space[y] and not is_boundary[x])` bytes.
    """
    n = max(sp.vocab_size(), vocab_size)
    base_bytes = torch.zeros(n, dtype=torch.int16)
    has_leading_space = torch.zeros(n, dtype=torch.bool)
    is_boundary = torch.ones(n, dtype=torch.bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary
