"""Document isolation needs a BOS: with a tokenizer that has none (SentencePiece bos_id -1), id 1 is an
ordinary piece, so `--doc-isolated` is refused in one `error:` line by train.py and crawler.evaluate, where
the data is loaded, and the ops that take the tokenizer's bos_id refuse -1."""
import io

import pytest
import sentencepiece as spm
import torch
from conftest import filled_crawler
from trainer_fixtures import CLI_FAST, CLI_SMALL_MODEL, VOCAB, restore_threads, synthetic_documents  # noqa: F401

import kernels
import train as train_cli
from crawler import evaluate
from crawler.data import write_shard
from crawler.documents import document_segments
from crawler.errors import SetupError
from crawler.quant import build_artifact
from crawler.tokenizer import load_tokenizer, tokenizer_identity
from crawler.training import prepare_data


@pytest.fixture(scope="module")
def bosless(tmp_path_factory):
    """A data directory whose tokenizer has no BOS, its documents encoded back to back."""
    root = tmp_path_factory.mktemp("bosless")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic_documents(80, 0)), model_writer=proto,
                                   vocab_size=VOCAB, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=-1,
                                   eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2)
    tok = root / "tok.model"
    tok.write_bytes(proto.getvalue())
    sp = load_tokenizer(tok)
    assert sp.bos_id() == -1
    data = root / "data"
    data.mkdir()
    for split, seed in (("train", 0), ("val", 1)):
        write_shard(data / f"fineweb_{split}_000000.bin", [t for ids in sp.encode(synthetic_documents(40, seed))
                                                          for t in ids])
    return data, tok


def one_error_line(capsys, prog: str) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    return lines[0]


def test_train_and_evaluate_refuse_doc_isolation_without_a_bos(bosless, tmp_path, capsys):
    data_dir, tok = bosless
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--iterations", "1",
            "--no-quantize", "--no-baselines", "--out-dir", tmp_path / "run"]
    assert train_cli.main([str(a) for a in [*argv, "--doc-isolated"]]) == 2
    line = one_error_line(capsys, "train.py")
    assert f"document isolation (--doc-isolated) needs a BOS, and tokenizer {str(tok)!r} has none" in line, line
    assert not (tmp_path / "run" / "final_model.pt").exists()

    model = filled_crawler(0, vocab_size=VOCAB)
    artifact = tmp_path / "model.ptz"
    build_artifact(model, None, plan="rtn_seed_floor", out_path=artifact,
                   tokenizer=tokenizer_identity(tok, load_tokenizer(tok)), log=None)
    assert evaluate.main([str(a) for a in ("--artifact", artifact, "--data-dir", data_dir, "--tokenizer", tok,
                                           "--device", "cpu", "--mode", "plain", "--doc-isolated")]) == 2
    assert "needs a BOS" in one_error_line(capsys, "python -m crawler.evaluate")

    with pytest.raises(SetupError, match="needs a BOS"):
        prepare_data(data_dir, tok, VOCAB, doc_isolated=True)
    data = prepare_data(data_dir, tok, VOCAB)                   # without isolation the data is fine
    assert data.bos_id == -1


def test_the_ops_that_take_the_tokenizers_bos_id_refuse_none():
    ids = torch.randint(0, VOCAB, (2, 16))
    for bad in (-1, None, True):
        with pytest.raises(ValueError, match="bos_id: expected the token id that starts a document"):
            document_segments(ids, bos_id=bad)
    model = filled_crawler(0, vocab_size=VOCAB)
    args = (ids, model.tok_emb.weight, model.bigram.table.weight, model.bigram.proj.weight, model.smear.gate)
    with pytest.raises(ValueError, match="bos_id"):
        kernels.reference.embed(*args, bos_id=-1)
    assert document_segments(ids, bos_id=1).bos_id == 1
