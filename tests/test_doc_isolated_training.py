"""Document-isolated training (TrainConfig.doc_isolated, `--doc-isolated`): every micro-batch and every
validation window reaches the model with its own document segments; a resumed run equals an
uninterrupted one; two gloo DDP processes equal one process with the same global batch; train.py
evaluates the artifact isolated and records the option."""
import json

import pytest
import torch
from trainer_fixtures import VOCAB, fast_train_config, make_dataset, restore_threads, run_gloo, small_config  # noqa: F401

import train as train_cli
from crawler.artifact import model_from_artifact
from crawler.checkpoint import model_from_checkpoint
from crawler.documents import document_segments
from crawler.evaluate import sliding_window_bpb, val_bpb
from crawler.model import CrawlerGPT
from crawler.runtime import DistContext
from crawler.tokenizer import BOS_ID
from crawler.training import prepare_data, train

VAL_TOKENS = 16 * 16 + 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("doc_train"))


@pytest.fixture(scope="module")
def data(dataset):
    return prepare_data(*dataset, VOCAB, val_max_tokens=VAL_TOKENS)


def quiet(msg):
    pass


def run(data, out_dir=None, resume=None, **tc):
    torch.set_num_threads(1)
    return train(small_config(), fast_train_config(doc_isolated=True, **tc), data, out_dir=out_dir,
                 ops="reference", resume=resume, log=quiet)


def test_every_forward_gets_its_batch_segments(data, monkeypatch):
    seen = []
    forward_hidden = CrawlerGPT.forward_hidden

    def spy(self, input_ids, cache=None, documents=None):
        seen.append((torch.is_grad_enabled(), input_ids.clone(), documents))
        return forward_hidden(self, input_ids, cache, documents)

    monkeypatch.setattr(CrawlerGPT, "forward_hidden", spy)
    res = run(data, iterations=6)
    assert res.summary["train_config"]["doc_isolated"] is True
    assert res.summary["final_val_bpb"] < res.summary["initial_val_bpb"] - 0.5
    assert {grad for grad, _, _ in seen} == {True, False}        # training steps and validation windows
    for _, ids, documents in seen:
        assert documents is not None and torch.equal(documents.cu_seqlens, document_segments(ids).cu_seqlens)
    bos_inside = sum(int((ids[:, 1:] == BOS_ID).sum()) for grad, ids, _ in seen if grad)
    assert bos_inside > 0                                          # the batches really hold several documents


class Killed(Exception):
    pass


def killed_after_step_3(msg):
    if msg.startswith("step:3/5 train_loss"):
        raise Killed(msg)


def test_resume_equals_uninterrupted(data, tmp_path):
    full = run(data, tmp_path / "full", iterations=5, checkpoint_every=2)
    torch.set_num_threads(1)
    tc = fast_train_config(doc_isolated=True, iterations=5, checkpoint_every=2)
    with pytest.raises(Killed):        # the run dies after step 3; its checkpoint holds step 2
        train(small_config(), tc, data, out_dir=tmp_path / "cut", ops="reference", log=killed_after_step_3)
    resumed = run(data, tmp_path / "cut", iterations=5, checkpoint_every=2, resume=tmp_path / "cut" / "checkpoint.pt")
    assert resumed.summary["resumed_from_step"] == 2
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    assert full.summary["final_val_bpb"] == resumed.summary["final_val_bpb"]


def _ddp_worker(rank, world, data_dir, tok, out_dir):
    data = prepare_data(data_dir, tok, VOCAB, val_max_tokens=VAL_TOKENS)
    ctx = DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    train(small_config(), fast_train_config(iterations=4, doc_isolated=True), data, out_dir=out_dir,
          ops="reference", ctx=ctx, log=quiet)


def test_two_process_ddp_matches_one_process(dataset, data, tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    run_gloo(_ddp_worker, tmp_path, *map(str, dataset), str(ddp_dir))
    ddp = json.loads((ddp_dir / "summary.json").read_text())
    single = run(data, iterations=4, grad_accum_steps=2)      # the two ranks' spans as two micro-batches
    assert ddp["world_size"] == 2 and ddp["train_config"]["doc_isolated"] is True
    ddp_losses = [l for _, l in ddp["history"]["train_loss"]]
    assert ddp_losses == pytest.approx([l for _, l in single.summary["history"]["train_loss"]], rel=1e-4, abs=1e-4)
    assert ddp["final_val_bpb"] == pytest.approx(single.summary["final_val_bpb"], rel=1e-4)
    ddp_model = model_from_checkpoint(ddp_dir / "final_model.pt", ops="reference").state_dict()
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp_model[k], v, atol=1e-4, rtol=1e-3), k


def test_train_cli_evaluates_the_artifact_isolated_and_records_it(dataset, data, tmp_path, capsys):
    data_dir, tok = dataset
    out = tmp_path / "run"
    argv = ["--data-dir", data_dir, "--tokenizer", tok, "--vocab-size", VOCAB, "--train-seq-len", 16,
            "--train-batch-tokens", 128, "--model-set", "model_dim=32", "--model-set", "bigram_buckets=64",
            "--model-set", "bigram_dim=8", "--model-set", "ve_dim=8", "--device", "cpu", "--threads", 1,
            "--max-wallclock-seconds", 0, "--iterations", 3, "--val-every", 0, "--val-max-tokens", VAL_TOKENS,
            "--muon-dtype", "float32", "--grad-accum-steps", 1, "--quant-plan", "rtn_seed_floor",
            "--no-compare-quant", "--quant-small-numel", 0, "--eval-stride", 8, "--ttt-chunk-tokens", 64,
            "--out-dir", out, "--doc-isolated"]
    assert train_cli.main([str(a) for a in argv]) == 0
    stdout = capsys.readouterr().out
    assert "documents isolated" in stdout and "isolated at each BOS" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["doc_isolated"] is True and summary["train_config"]["doc_isolated"] is True
    artifact = model_from_artifact(out / "model.int6.ptz", ops="reference")
    plain = val_bpb(artifact, data.val_tokens, data.luts, seq_len=16, doc_isolated=True)
    sliding = sliding_window_bpb(artifact, data.val_tokens, data.luts, seq_len=16, stride=8, doc_isolated=True)
    assert summary["quantization"][0]["quant_val_bpb"] == pytest.approx(plain[1], rel=1e-6)
    assert summary["sliding_val_bpb"] == pytest.approx(sliding[1], rel=1e-6)
    crossing = sliding_window_bpb(artifact, data.val_tokens, data.luts, seq_len=16, stride=8)
    assert summary["sliding_val_bpb"] != pytest.approx(crossing[1], rel=1e-5)


@pytest.mark.gpu
def test_gpu_compiled_doc_isolated_training_does_not_recompile(data, monkeypatch):
    """On CUDA: Triton ops, bf16 autocast, torch.compile(fullgraph=True) as the trainer compiles, with
    documents padded to the fixed capacity: one compiled frame for every batch, and the loss falls."""
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("inductor")
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counter, **kw))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    tc = fast_train_config(iterations=20, warmup_steps=2, compile=True, muon_dtype="bfloat16", doc_isolated=True)
    s = train(small_config(model_dim=64), tc, data, ops="auto", ctx=ctx, log=quiet).summary
    assert s["compiled"] and s["final_val_bpb"] < s["initial_val_bpb"] - 0.5
    assert counter.frame_count == 1
