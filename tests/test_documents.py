"""Document isolation in the model (crawler/documents.py, CrawlerGPT(..., documents)): segments cut at
row starts and BOS tokens, padded to a fixed capacity; a document's per-token losses in a packed batch
equal its losses alone (float and int6 model), the Triton ops match the references, ops without varlen
are refused, and a compiled model takes new documents without recompiling."""
import dataclasses

import pytest
import torch
from conftest import filled_crawler, rel_err
from torch._dynamo.testing import CompileCounterWithBackend

from crawler.decoding import KVCache
from crawler.documents import SEGMENTS_PER_ROW, Documents, document_segments, segment_capacity
from crawler.inference import load_int6_model
from crawler.model import CrawlerGPT
from crawler.quant import PLANS, RoleSpec, quantize_state_dict
from crawler.tokenizer import BOS_ID

V = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def packed_batch(rows: int, T: int, bos_at: dict[int, list[int]], seed: int = 0) -> torch.Tensor:
    """Random ids in [2, V) (no BOS) with BOS_ID at bos_at[row] positions."""
    ids = torch.randint(2, V, (rows, T), generator=torch.Generator().manual_seed(seed))
    for r, cols in bos_at.items():
        ids[r, cols] = BOS_ID
    return ids


def pieces(documents: Documents, T: int) -> list[tuple[int, int, int]]:
    """The non-empty segments as (row, start, end) within their row."""
    cu = documents.cu_seqlens.tolist()
    return [(a // T, a % T, a % T + (b - a)) for a, b in zip(cu, cu[1:]) if b > a]


# -- segments ----------------------------------------------------------------------------------------

def test_segments_start_at_rows_and_bos_tokens():
    # row 0: BOS at 0 and 5; row 1: no BOS (the document of row 0 continues); row 2: BOS at 3 and 7
    ids = packed_batch(3, 8, {0: [0, 5], 2: [3, 7]})
    d = document_segments(ids)
    assert d.cu_seqlens.dtype == torch.int32 and d.max_seqlen == 8 and d.bos_id == BOS_ID
    assert d.cu_seqlens.tolist() == [0, 5, 8, 16, 19, 23, 24]


def test_capacity_pads_with_repeated_ends_and_doubles_when_exceeded():
    ids = packed_batch(2, 8, {0: [3], 1: [2, 6]})            # 5 segments
    assert segment_capacity(2) == 2 * SEGMENTS_PER_ROW
    assert document_segments(ids, capacity=16).cu_seqlens.tolist() == [0, 3, 8, 10, 14] + [16] * 12
    assert document_segments(ids, capacity=2).cu_seqlens.tolist() == [0, 3, 8, 10, 14, 16, 16, 16, 16]
    assert document_segments(ids, capacity=5).cu_seqlens.tolist() == [0, 3, 8, 10, 14, 16]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"ids: expected a \(B, T\) integer tensor"):
        document_segments(torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ids: expected a \(B, T\) integer tensor"):
        document_segments(torch.ones(2, 8))
    with pytest.raises(ValueError, match="capacity: expected None or an int >= 1"):
        document_segments(torch.ones(2, 8, dtype=torch.int64), capacity=0)


# -- the model ---------------------------------------------------------------------------------------

def int6_model(model: CrawlerGPT) -> CrawlerGPT:
    rtn = RoleSpec("rtn")
    plan = dataclasses.replace(PLANS["rtn_seed_floor"], block=rtn, tok_emb=rtn, bigram_table=rtn, bigram_proj=rtn,
                               ve_table=rtn, ve_proj=rtn, small_numel=0)
    return load_int6_model(quantize_state_dict(model.state_dict(), model.config, plan=plan, log=None).artifact,
                           ops="reference")


@pytest.mark.parametrize("kind", ["float", "int6"])
def test_each_document_scores_as_it_would_alone(kind):
    """A random model (every gate and projection non-zero, so a leak would show): each segment's
    per-token losses in the packed, isolated batch equal the same tokens run on their own, whatever the
    other documents are; without isolation they do not."""
    model = filled_crawler(3).eval()
    model = int6_model(model) if kind == "int6" else model
    T = 24
    ids = packed_batch(2, T, {0: [0, 7, 8, 19], 1: [11]}, seed=1)   # a 1-token document; one crossing rows
    targets = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(2))
    documents = document_segments(ids, capacity=segment_capacity(2))
    with torch.no_grad():
        packed = model.token_nll(ids, targets, documents)
        dense = model.token_nll(ids, targets)
        segments = pieces(documents, T)
        assert len(segments) == 6
        for r, a, b in segments:
            alone = model.token_nll(ids[r:r + 1, a:b], targets[r:r + 1, a:b])[0]
            assert rel_err(packed[r, a:b], alone) < 1e-5, (r, a, b)
    # a row's first segment has nothing before it, isolated or not; the documents after a BOS see the
    # earlier ones without isolation
    assert rel_err(dense[0, :7], packed[0, :7]) < 1e-5 and rel_err(dense[1, :11], packed[1, :11]) < 1e-5
    assert rel_err(dense[0, 8:19], packed[0, 8:19]) > 1e-3 and rel_err(dense[1, 11:], packed[1, 11:]) > 1e-3


def test_triton_ops_match_the_references_with_documents():
    """The model on the Triton kernels (interpreter) with documents: loss and every gradient equal the
    reference ops' (fp32)."""
    reference = filled_crawler(4, num_flat_blocks=2, num_crawler_blocks=1, crawler_loops=1, ve_last_n=1)
    triton = CrawlerGPT(reference.config, ops="triton")
    triton.load_state_dict(reference.state_dict())
    ids = packed_batch(2, 16, {0: [4, 5], 1: [9]}, seed=5)
    targets = torch.roll(ids, -1, 1)
    documents = document_segments(ids, capacity=segment_capacity(2))
    losses = []
    for model in (reference, triton):
        model.zero_grad()
        loss = model(ids, targets, documents)
        loss.backward()
        losses.append(loss)
    assert rel_err(losses[1], losses[0]) < 1e-5
    ref_grads = dict(reference.named_parameters())
    for name, p in triton.named_parameters():
        if p.grad is not None:
            assert rel_err(p.grad, ref_grads[name].grad) < 1e-4, name


def test_ops_without_varlen_are_refused():
    from bench.baselines import SEED_OPS  # the seed's SDPA attention: no cu_seqlens
    model = CrawlerGPT(filled_crawler(0).config, ops=SEED_OPS)
    ids = packed_batch(1, 16, {0: [6]})
    with pytest.raises(ValueError, match="documents: the ops SeedOps cannot isolate documents"):
        model(ids, ids, document_segments(ids))
    reference = filled_crawler(0)
    with pytest.raises(ValueError, match="not supported with a KV cache"):
        reference.forward_hidden(ids, cache=KVCache(reference.config, 32), documents=document_segments(ids))


def test_compiled_model_takes_new_documents_without_recompiling():
    """torch.compile(fullgraph=True, dynamic=False), as the trainer compiles: batches whose documents
    differ (same capacity) reuse one graph, forward and backward equal to eager."""
    filled = filled_crawler(5, num_flat_blocks=1, num_crawler_blocks=0, crawler_loops=1, ve_last_n=1)
    model = CrawlerGPT(filled.config, ops="triton")
    model.load_state_dict(filled.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for seed, bos in enumerate(({0: [3]}, {0: [1, 9], 1: [4, 5, 12]})):
        ids = packed_batch(2, 16, bos, seed=seed)
        documents = document_segments(ids, capacity=segment_capacity(2))
        eager = model(ids, torch.roll(ids, -1, 1), documents)
        eager_grads = torch.autograd.grad(eager, params, allow_unused=True)
        out = compiled(ids, torch.roll(ids, -1, 1), documents)
        grads = torch.autograd.grad(out, params, allow_unused=True)
        assert torch.allclose(out, eager, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, eager_grads):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert counter.frame_count == 1
