"""GPU tests of the paths no other GPU test reaches (issue 23 part 7), through the public APIs only, each
against the float64 reference, in bf16: attention without XSA (dense and varlen), queries after a KV cache
(Tq < Tk) and decoding (Tq = 1), varlen in the document-isolated trainer's padded layout (cu_seqlens with
repeated ends), every attention call in the model's head layout (heads of 46 zero-padded to 48 columns,
softmax_scale 1/sqrt(46), q_gain, its gradient checked too), cross-entropy at 65,536 tokens (the single
vocabulary split production takes), `embed` with bos_id, GPTQ at 8192 x 736 (the tied embedding's shape),
and the compiled whole model. Sizes keep each test to seconds; the compiled model (Inductor) runs with the
model tests in `make gpu-check`. Every test needs CUDA and skips without it; the module imports torch,
triton and kernels/ only."""
import pytest
import torch
from conftest import correlated_hessian, rel_err
from test_gpu_configs import SOFTMAX_SCALE, model_heads, q_gain

import kernels
from kernels import reference

pytestmark = pytest.mark.gpu
H, HKV, D, D_MODEL, VOCAB = 16, 8, 46, 736, 8192


def randn(*shape, seed, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


def check_attention(q, k, v, *, cache_rows=None, fwd_bound=1e-2, grad_bound=2e-2, **kwargs):
    """kernels.attention in the model's layout: q, k, v (heads of D = 46 columns) zero-padded to 48, the
    scale 1/sqrt(46), the per-head q_gain; forward and dq/dk/dv/dq_gain against the float64 reference on the
    same upstream gradient (zero in the pad, as the model's). With `cache_rows`, k and v are views of their
    first cache_rows rows (cache buffers)."""
    q, k, v = (model_heads(t) for t in (q, k, v))
    if cache_rows is not None:
        k, v = k[:, :cache_rows], v[:, :cache_rows]
    dz = model_heads(torch.randn(*q.shape[:-1], D, dtype=q.dtype, device=q.device))
    kwargs.update(softmax_scale=SOFTMAX_SCALE)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, q_gain())]
    out = kernels.attention(*leaves[:3], q_gain=leaves[3], **kwargs)
    grads = torch.autograd.grad(out, leaves, dz)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.attention(*ref_in[:3], q_gain=ref_in[3], **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_in, dz.double())
    assert out.shape == q.shape and rel_err(out, ref) < fwd_bound, f"forward rel err {rel_err(out, ref):.2e}"
    for name, g, r in zip(("q", "k", "v", "q_gain"), grads, ref_grads):
        assert rel_err(g, r) < grad_bound, f"d{name} rel err {rel_err(g, r):.2e}"


def cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("xsa", [False, True])
def test_dense_attention(xsa):
    """2 x 1024 tokens, 16 / 8 heads of 46 (laid out as 48); without XSA the only GPU test of that path."""
    q, k, v = randn(2, 1024, H + 2 * HKV, D, seed=1).split([H, HKV, HKV], dim=2)
    check_attention(q, k, v, causal=True, xsa=xsa)


@pytest.mark.parametrize("xsa", [False, True])
def test_varlen_attention(xsa):
    """Packed documents of 1 to 1,500 tokens (4,096 rows), max_seqlen given as the trainer gives it."""
    lengths = [1500, 1, 37, 800, 1024, 734]
    q, k, v = randn(sum(lengths), H + 2 * HKV, D, seed=2).split([H, HKV, HKV], dim=1)
    check_attention(q, k, v, causal=True, xsa=xsa, cu_seqlens=cu(lengths), max_seqlen=max(lengths))


def test_varlen_attention_in_the_padded_capacity_layout():
    """The document-isolated trainer's layout: a fixed number of segments per micro-batch, the unused ones
    empty at the end (cu_seqlens repeating its last offset), as (1, total, H, D) with max_seqlen = T."""
    lengths = [700, 300, 1048, 0, 0, 0, 0, 0]
    q, k, v = randn(1, sum(lengths), H + 2 * HKV, D, seed=3).split([H, HKV, HKV], dim=2)
    offsets = cu(lengths)
    assert offsets[-6:].unique().numel() == 1
    check_attention(q, k, v, causal=True, xsa=True, cu_seqlens=offsets, max_seqlen=2048)


@pytest.mark.parametrize("xsa", [False, True])
@pytest.mark.parametrize("Tq, Tk", [(256, 1024), (1, 777), (1, 2048)])
def test_queries_after_a_kv_cache(Tq, Tk, xsa):
    """Queries as the last Tq of Tk positions (a KV cache's new tokens), decoding at Tq = 1 (with gradients:
    the training kernels, not flash-decoding); k/v views of the first Tk rows of longer cache buffers
    (B, max_len, Hkv, 48), as the model's KVCache hands them over."""
    q = randn(4, Tq, H, D, seed=Tq)
    k, v = (randn(4, Tk + 9, HKV, D, seed=Tk + i) for i in (0, 1))
    check_attention(q, k, v, causal=True, xsa=xsa, cache_rows=Tk)


def test_cross_entropy_at_65536_tokens():
    """A pr1579 micro-batch (32 x 2048 tokens, d 736, vocabulary 8192, softcap 30): the path that fills
    the GPU without splitting the vocabulary. The float64 reference runs 8,192 tokens at a time."""
    n, chunk = 65536, 8192
    hidden, weight = randn(n, D_MODEL, seed=4), randn(VOCAB, D_MODEL, seed=5, scale=0.05)
    targets = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(6)).cuda()
    leaves = [t.detach().requires_grad_() for t in (hidden, weight)]
    loss = kernels.softcapped_cross_entropy(*leaves, targets, 30.0)
    grads = torch.autograd.grad(loss, leaves)
    ref_loss, ref_dh, ref_dw = 0.0, [], torch.zeros(VOCAB, D_MODEL, dtype=torch.float64, device="cuda")
    w64 = weight.detach().double().requires_grad_()
    for s in range(0, n, chunk):
        h64 = hidden[s:s + chunk].detach().double().requires_grad_()
        part = reference.softcapped_cross_entropy(h64, w64, targets[s:s + chunk], 30.0) * (chunk / n)
        dh, dw = torch.autograd.grad(part, (h64, w64))
        ref_loss, ref_dw = ref_loss + float(part), ref_dw + dw
        ref_dh.append(dh)
    assert abs(float(loss) - ref_loss) / ref_loss < 1e-3
    assert rel_err(grads[0], torch.cat(ref_dh)) < 2e-2
    assert rel_err(grads[1], ref_dw) < 2e-2


def test_embed_with_bos_id():
    """4 x 2048 ids of packed documents (BOS = 1 starts each): BigramHash and SmearGate restart at every
    BOS, forward and every gradient against the float64 reference."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (4, 2048), generator=g)
    ids[torch.rand(4, 2048, generator=g) < 0.002] = 1
    ids[:, 0] = 1
    ids = ids.cuda()
    params = [randn(VOCAB, D_MODEL, seed=8), randn(10240, 128, seed=9),
              randn(D_MODEL, 128, seed=10, dtype=torch.float32, scale=0.1),
              randn(D_MODEL, seed=11, dtype=torch.float32)]
    grad_out = randn(4, 2048, D_MODEL, seed=12, dtype=torch.float32)
    leaves = [p.detach().requires_grad_() for p in params]
    out = kernels.embed(ids, *leaves, bos_id=1)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    ref_in = [p.detach().double().requires_grad_() for p in params]
    ref = reference.embed(ids, *ref_in, bos_id=1)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    assert rel_err(out, ref) < 1e-2
    for name, a, b in zip(("tok_emb", "bigram_table", "bigram_proj", "smear_gate"), grads, ref_grads):
        assert rel_err(a, b) < 2e-2, f"d{name} rel err {rel_err(a, b):.2e}"


def test_gptq_at_the_tied_embedding_shape():
    """GPTQ int6 of an 8192 x 736 matrix (the tied embedding, the largest the model quantises) against the
    float64 reference: equal scales, at most 0.1 % of codes differing (rounding ties)."""
    weight = randn(VOCAB, D_MODEL, seed=13, dtype=torch.float32, scale=0.037)
    hessian = correlated_hessian(D_MODEL, n=2 * D_MODEL, seed=14, device="cuda")
    codes, scales = kernels.gptq_quantize(weight, hessian)
    ref_codes, ref_scales = reference.gptq_quantize(weight.double(), hessian.double())
    assert codes.shape == (VOCAB, D_MODEL) and codes.dtype == torch.int8
    assert torch.equal(scales.cpu(), ref_scales.cpu())
    mismatch = (codes != ref_codes.to(codes.device)).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.3%} of codes differ from the reference"


def test_compiled_whole_model_matches_the_reference_ops():
    """The pr1579 model with every Triton op, torch.compile(fullgraph=True) as the trainer compiles it, under
    bf16 autocast: one micro-batch of 2 x 2048 tokens, its loss and every parameter's gradient against the
    same model with the reference ops, eager. Both are bf16 computations: the bounds are bf16-level."""
    # imported here, so that the module imports without crawler's packages
    from crawler import CrawlerConfig, CrawlerGPT

    config = CrawlerConfig.preset("pr1579")
    g = torch.Generator().manual_seed(15)
    ids = torch.randint(0, config.vocab_size, (2, config.train_seq_len), generator=g).cuda()
    targets = torch.randint(0, config.vocab_size, (2, config.train_seq_len), generator=g).cuda()

    def loss_and_grads(ops, compile_it):
        torch.manual_seed(0)
        model = CrawlerGPT(config, ops=ops).cuda()
        with torch.no_grad():              # non-trivial zero-init projections so every path carries signal
            for name, p in model.named_parameters():
                if name.endswith("proj.weight"):
                    p.normal_(0, 0.02)
        run = torch.compile(model, dynamic=False, fullgraph=True) if compile_it else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(ids, targets)
        loss.backward()
        return float(loss), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads("triton", True)
    ref_loss, ref_grads = loss_and_grads("reference", False)
    assert abs(loss - ref_loss) / ref_loss < 2e-2, (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    total = torch.cat([r.flatten() for r in ref_grads.values()]).norm()
    for name, r in ref_grads.items():
        assert (grads[name] - r).norm() <= 0.1 * r.norm() + 1e-3 * total, name
