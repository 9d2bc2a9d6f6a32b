"""Document-isolated evaluation (docs/evaluation.md "Document isolation"): with `doc_isolated`, plain,
sliding-window and legal-TTT val_bpb score each document as it scores alone, whatever documents come
before it (every target still scored exactly once); TTT trains within documents; the command line's
--doc-isolated scores the int6 model so and says it did."""
import dataclasses

import pytest
import torch
from conftest import filled_crawler
from trainer_fixtures import VOCAB, make_dataset

from crawler.artifact import save_artifact
from crawler.bpb import target_bytes
from crawler.data import load_validation_tokens
from crawler.documents import document_segments
from crawler.evaluate import main, sliding_window_bpb, val_bpb
from crawler.inference import load_int6_model
from crawler.model import CrawlerGPT
from crawler.quant import PLANS, RoleSpec, quantize_state_dict
from crawler.tokenizer import BOS_ID, byte_luts, load_tokenizer
from crawler.ttt import TTTConfig, legal_ttt_bpb

T, STRIDE = 16, 4
V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def context_model(seed: int = 7, **overrides) -> CrawlerGPT:
    """A random model whose predictions depend on their context (tok_emb scaled up: logits of several
    units), so attending across a document boundary changes a score visibly."""
    model = filled_crawler(seed, train_seq_len=T, **overrides).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(100)
    return model


@pytest.fixture(scope="module")
def model():
    return context_model()


def luts():
    ids = torch.arange(V)
    return ((ids % 3 + 1).to(torch.int16), ids % 2 == 0, ids == 0)


def documents(lengths, seed):
    """[BOS] + random ids in [2, V) for each length (length 1: a bare BOS)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat((torch.tensor([BOS_ID]), torch.randint(2, V, (n - 1,), generator=g))) for n in lengths]


@torch.no_grad()
def alone(model, doc, followed: bool) -> tuple[float, float]:
    """(nats, bytes) of a document's targets scored on its own, from its BOS: its tokens after the
    first, then the next document's BOS when one follows."""
    targets = torch.cat((doc[1:], torch.tensor([BOS_ID]))) if followed else doc[1:]
    x = doc[:targets.numel()][None]
    if targets.numel() == 0:
        return 0.0, 0.0
    nll = model.token_nll(x, targets[None])
    return float(nll.double().sum()), float(target_bytes(x, targets[None], luts()).sum())


def expected(model, docs, *, trailing_bos: bool = False) -> tuple[float, float]:
    """(val_loss, val_bpb) if every document scores as it does alone."""
    parts = [alone(model, d, followed=i < len(docs) - 1 or trailing_bos) for i, d in enumerate(docs)]
    nats, nbytes = sum(p[0] for p in parts), sum(p[1] for p in parts)
    n = sum(d.numel() for d in docs) - (0 if trailing_bos else 1)
    return nats / n, nats / (torch.log(torch.tensor(2.0)).item() * nbytes)


def test_sliding_window_scores_every_document_as_alone(model):
    """Documents of at most T − stride + 1 tokens (so a window always holds a target's whole document):
    the isolated sliding-window loss is the sum of each document's loss scored alone, in every order of
    the documents, so no document's loss depends on the documents before it. Without isolation it is not."""
    docs = documents([5, 1, 13, 9, 2, 12, 7, 13, 3, 11, 6], seed=0)
    orders = (list(range(11)), [10, 7, 3, 1, 9, 0, 2, 5, 4, 8, 6], [2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 0])
    for order in orders:
        arranged = [docs[i] for i in order]
        stream = torch.cat(arranged)
        got = sliding_window_bpb(model, stream, luts(), seq_len=T, stride=STRIDE, batch_seqs=5, doc_isolated=True)
        assert got == pytest.approx(expected(model, arranged), rel=1e-6)
    crossing = sliding_window_bpb(model, stream, luts(), seq_len=T, stride=STRIDE, batch_seqs=5)
    assert crossing[0] != pytest.approx(expected(model, arranged)[0], rel=1e-4)


def test_plain_val_bpb_scores_every_document_as_alone(model):
    """Documents that tile the windows exactly (a document cut by a window edge loses its context, as
    any window does): the isolated plain val_bpb is the sum of the documents scored alone."""
    lengths = [[5, 11], [16], [1, 3, 12], [8, 8]]          # each row of T = 16 tokens
    docs = documents([n for row in lengths for n in row], seed=1)
    stream = torch.cat(docs + [torch.tensor([BOS_ID])])  # the last target: the next document's BOS
    got = val_bpb(model, stream, luts(), seq_len=T, batch_seqs=3, doc_isolated=True)
    assert got == pytest.approx(expected(model, docs, trailing_bos=True), rel=1e-6)
    assert val_bpb(model, stream, luts(), seq_len=T, batch_seqs=3)[0] != pytest.approx(got[0], rel=1e-4)


def test_ttt_scores_as_alone_at_lr_0_and_trains_within_documents(model, monkeypatch):
    """Legal TTT with isolation: at lr 0 every document scores as alone (= the isolated sliding window);
    with lr > 0 every training forward gets the segments of its own sequences."""
    docs = documents([7, 13, 4, 10, 1, 12, 13, 6, 9, 3, 11, 8, 5], seed=2)
    stream = torch.cat(docs)
    frozen = TTTConfig(chunk_tokens=2 * T, epochs=1, lr=0.0, batch_seqs=2)
    got = legal_ttt_bpb(context_model(), stream, luts(), seq_len=T, stride=STRIDE, batch_seqs=4,
                        config=frozen, log=None, doc_isolated=True)
    assert got == pytest.approx(expected(model, docs), rel=1e-6)

    seen = []
    forward = CrawlerGPT.forward

    def spy(self, input_ids, target_ids, documents=None):
        if torch.is_grad_enabled():
            seen.append((input_ids.clone(), documents))
        return forward(self, input_ids, target_ids, documents)

    monkeypatch.setattr(CrawlerGPT, "forward", spy)
    trained = legal_ttt_bpb(context_model(), stream, luts(), seq_len=T, stride=STRIDE,
                            batch_seqs=4, config=dataclasses.replace(frozen, lr=0.05), log=None, doc_isolated=True)
    assert trained[1] != pytest.approx(got[1], rel=1e-4)
    assert len(seen) == 3 * 1 and all(d is not None for _, d in seen)     # 3 trained chunks of one batch
    for x, d in seen:
        assert torch.equal(d.cu_seqlens, document_segments(x).cu_seqlens)
    assert sum(d.cu_seqlens.numel() - 1 - x.shape[0] for x, d in seen) > 0     # BOS inside the sequences


# -- the command line on an int6 artifact ------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc_cli")
    data_dir, tok = make_dataset(root, train_docs=40, val_docs=12, train_shards=1)
    model = context_model(8, vocab_size=VOCAB)
    rtn = RoleSpec("rtn")
    plan = dataclasses.replace(PLANS["rtn_seed_floor"], block=rtn, small_numel=0)
    save_artifact(quantize_state_dict(model.state_dict(), model.config, plan=plan, log=None).artifact,
                  root / "model.int6")
    return root, data_dir, tok


def test_cli_doc_isolated_scores_the_int6_model_isolated(cli_files, capsys):
    root, data_dir, tok = cli_files
    args = ["--artifact", root / "model.int6", "--data-dir", data_dir, "--tokenizer", tok, "--device", "cpu",
            "--ops", "reference", "--seq-len", T, "--stride", STRIDE, "--max-val-tokens", 400]
    lines = {}
    for isolated in (False, True):
        code = main([str(a) for a in args + ["--mode", "sliding"] + (["--doc-isolated"] if isolated else [])])
        out = capsys.readouterr()
        assert code == 0, out.err
        lines[isolated] = out.out.strip().splitlines()[-1]
    assert " doc_isolated:1 " in lines[True] and " doc_isolated:0 " in lines[False]   # before the budget word
    tokens = load_validation_tokens(data_dir, max_tokens=400)
    sp_luts = byte_luts(load_tokenizer(tok), VOCAB)
    direct = sliding_window_bpb(load_int6_model(root / "model.int6", ops="reference"), tokens, sp_luts, seq_len=T,
                                stride=STRIDE, doc_isolated=True)
    printed = {k: float(v.split("val_bpb:")[1].split()[0]) for k, v in lines.items()}
    assert printed[True] == pytest.approx(direct[1], abs=6e-5)
    assert printed[False] != pytest.approx(printed[True], abs=1e-3)
