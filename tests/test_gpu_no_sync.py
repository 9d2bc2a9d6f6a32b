"""No host sync in a training step or an evaluation step on a GPU (docs/ops.md "Host syncs"): after a
warm-up (compilation and autotuning synchronise, legitimately, once), one compiled training step of the
trainer and eager evaluation forwards run under `torch.cuda.set_sync_debug_mode("error")`, which raises
on any operation that makes the host wait for the GPU (a value read, a blocking copy, a mask index).
tests/test_host_sync.py checks the ops' bodies on the CPU; these check everything around them."""
import contextlib

import pytest
import torch
from trainer_fixtures import VOCAB, fast_train_config, make_dataset, small_config

from crawler.bpb import plan_windows, score_windows, window_nll
from crawler.documents import document_segments
from crawler.model import CrawlerGPT
from crawler.runtime import DistContext, autocast, eval_mode, to_device
from crawler.training import prepare_data
from crawler.training.loop import _Trainer

pytestmark = pytest.mark.gpu


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data_dir, tok = make_dataset(tmp_path_factory.mktemp("no_sync_data"))
    return prepare_data(data_dir, tok, VOCAB, val_max_tokens=16 * 16 + 1)


@pytest.mark.parametrize("doc_isolated", [False, True])
def test_a_compiled_training_step_makes_no_host_sync(data, doc_isolated):
    """The trainer's train_step (batches to the device, forward + backward of the compiled model with the
    Triton ops under bf16 autocast, gradient clipping, Muon and Adam) after two warm-up steps."""
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    tc = fast_train_config(compile=True, muon_dtype="bfloat16", doc_isolated=doc_isolated, grad_clip_norm=1.0)
    trainer = _Trainer(small_config(model_dim=64), tc, data, None, "triton", ctx, log=lambda msg: None)
    for step in range(2):
        trainer.train_step(step, 1.0)
    with syncs_are_errors():
        loss = trainer.train_step(2, 1.0)
    assert torch.isfinite(loss)


def test_evaluation_forwards_make_no_host_sync(data):
    """window_nll (dense and document-isolated, segments from the CPU copy) and a batch of sliding-window
    scoring (score_windows: batches moved through pinned memory, masked sums), eager, on the Triton ops."""
    device = torch.device("cuda")
    model = CrawlerGPT(small_config(model_dim=64), ops="triton").to(device)
    tokens = data.val_tokens[:16 * 8 + 1].long()
    x_cpu, y_cpu = tokens[:-1].view(8, 16), tokens[1:].view(8, 16)
    x, y = to_device(x_cpu, device), to_device(y_cpu, device)
    luts = tuple(t.to(device) for t in data.luts)
    windows = plan_windows(tokens.numel() - 1, seq_len=16, stride=8)

    def evaluate_once():
        with torch.no_grad(), eval_mode(model), autocast(device):
            dense = window_nll(model, x, y, doc_isolated=False)
            isolated = window_nll(model, x, y, doc_isolated=True, x_cpu=x_cpu)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            score_windows(model, tokens, luts, windows, seq_len=16, batch_seqs=4, sums=sums, doc_isolated=True)
        return dense, isolated, sums

    evaluate_once()
    with syncs_are_errors():
        dense, isolated, sums = evaluate_once()
    assert torch.isfinite(dense).all() and torch.isfinite(isolated).all() and torch.isfinite(sums).all()
    # the isolated forward really isolated: windows holding a BOS after position 0 score differently
    assert document_segments(x_cpu).cu_seqlens.numel() > x_cpu.shape[0] + 1
    assert not torch.equal(dense, isolated)
