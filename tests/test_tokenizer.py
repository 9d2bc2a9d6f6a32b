"""Tokenizer: loading errors, deterministic training, the docs/math.md §6 byte LUT rules, the vocab check."""
import pytest
import torch

from crawler.corpus import builtin_documents
from crawler.tokenizer import BOS_ID, byte_luts, check_vocab, load_tokenizer, train_tokenizer

VOCAB = 400


@pytest.fixture(scope="module")
def docs():
    return list(builtin_documents(max_documents=30))


@pytest.fixture(scope="module")
def sp(docs, tmp_path_factory):
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "tok.model", VOCAB)


def rule_bytes(ids, luts):
    """docs/math.md §6: bytes of each target y after previous token x (ids[0] is the context only)."""
    base, space, boundary = luts
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    return base[y].long() + (space[y] & ~boundary[x]).long()


def test_load_missing_and_invalid(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece model"):
        load_tokenizer(bad)


def test_training_is_deterministic_and_exact(docs, sp, tmp_path):
    again = tmp_path / "again.model"
    train_tokenizer(docs, again, VOCAB)
    assert again.read_bytes() == sp.serialized_model_proto()
    assert sp.vocab_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.bos_id() == BOS_ID
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left its temporary file"


def test_training_rejects_bad_vocab(docs, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(docs, tmp_path / "t.model", 100)
    with pytest.raises(ValueError, match="vocab_size=60000"):
        train_tokenizer(docs[:2], tmp_path / "t.model", 60000)
    assert not (tmp_path / "t.model").exists()


def test_lut_categories(sp):
    base, space, boundary = byte_luts(sp, VOCAB + 16)
    assert base.dtype == torch.int16 and space.dtype == torch.bool and boundary.dtype == torch.bool
    assert base.shape == space.shape == boundary.shape == (VOCAB + 16,)
    # pad, bos, eos (control) and unk: no bytes, boundary.
    assert base[:4].tolist() == [0] * 4 and boundary[:4].all() and not space[:4].any()
    # Byte-fallback pieces <0x00>..<0xFF>: one byte each, not boundaries.
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and (base[byte_ids] == 1).all() and not boundary[byte_ids].any()
    # Table padding beyond the tokenizer: boundary, 0 bytes.
    assert (base[VOCAB:] == 0).all() and boundary[VOCAB:].all() and not space[VOCAB:].any()
    # Every ordinary piece: UTF-8 length after the leading "▁".
    for i in range(sp.vocab_size()):
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)):
            piece = sp.id_to_piece(i)
            assert bool(space[i]) == piece.startswith("\u2581")
            assert int(base[i]) == len(piece.removeprefix("\u2581").encode())


def test_lut_length_is_max_of_both_vocabs(sp):
    assert byte_luts(sp, VOCAB - 20)[0].shape == (VOCAB,)


def test_bytes_rule_leading_space(sp):
    luts = byte_luts(sp, VOCAB)
    spaced = next(i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581")
                  and len(sp.id_to_piece(i)) > 1)
    letters = len(sp.id_to_piece(spaced)[1:].encode())
    plain = sp.piece_to_id("a")
    assert plain != sp.unk_id()
    # After BOS the leading space is not charged; after an ordinary piece it is.
    assert rule_bytes([BOS_ID, spaced], luts).tolist() == [letters]
    assert rule_bytes([plain, spaced], luts).tolist() == [letters + 1]


def test_bytes_rule_counts_utf8_of_a_string(sp):
    # NFKC-stable, single spaces, so the normalised text is the text; "🙂" is absent from the training
    # docs and must go through four byte-fallback pieces.
    text = "Return the value 42, not café 🙂 here."
    ids = sp.encode(text)
    assert sum(sp.is_byte(i) for i in ids) >= 4
    assert sp.decode(ids) == text
    per_token = rule_bytes([BOS_ID] + ids, byte_luts(sp, VOCAB))
    assert int(per_token.sum()) == len(text.encode("utf-8")) == 41
    # Hand check, piece by piece.
    expected = []
    for i in ids:
        piece = sp.id_to_piece(i)
        expected.append(1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode()))
    assert per_token.tolist() == expected


def test_check_vocab(sp):
    check_vocab(sp, VOCAB)
    with pytest.raises(ValueError, match=f"{VOCAB} pieces.*vocab_size is {VOCAB + 1}.*--allow-tokenizer-mismatch"):
        check_vocab(sp, VOCAB + 1)           # smaller than the model: refused unless asked for
    check_vocab(sp, VOCAB + 1, allow_smaller=True)
    with pytest.raises(ValueError, match=f"{VOCAB} pieces.*vocab_size is {VOCAB - 1}"):
        check_vocab(sp, VOCAB - 1, allow_smaller=True)     # larger: never
