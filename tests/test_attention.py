"""kernels.attention (Triton, docs/math.md §1.9, §7.1-7.2) against kernels.reference.attention in float64:
forward and dq/dk/dv, on CPU under the Triton interpreter at small shapes and in bf16 at real shapes on a
GPU; queries trailing a longer key sequence (KV-cache decoding) and the model's cached decoding through
the op. Outputs are NaN-poisoned (conftest), so an element a kernel forgets to write fails. Varlen
(cu_seqlens) has its own file, test_varlen_attention.py."""
import pytest
import torch
from conftest import filled_crawler, rel_err

import kernels
from kernels import reference
from kernels.attention import attention

# ‖out − ref‖/‖ref‖ bounds per input dtype (forward, gradients): a few units of the dtype's rounding.
BOUNDS = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}


def _inputs(B, T, H, Hkv, D, dtype, device="cpu"):
    """Fresh random q, k, v as strided views of one fused (B, T, H + 2·Hkv, D) projection, the way a
    model splits a qkv linear: the kernels must read the strides, not assume contiguity."""
    qkv = torch.randn(B, T, H + 2 * Hkv, D, device=device, dtype=torch.float32)
    q, k, v = qkv.to(dtype).split([H, Hkv, Hkv], dim=2)
    return q, k, v


def _cached_inputs(B, Tq, Tk, H, Hkv, D, dtype):
    """q (B, Tq, H, D) for the last Tq of Tk positions; k, v (B, Tk, Hkv, D) strided views of a cache
    buffer longer than Tk, the way the model's KVCache hands them over."""
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    kv = torch.randn(B, Tk + 7, 2, Hkv, D, dtype=dtype)[:, :Tk]
    return q, kv[:, :, 0], kv[:, :, 1]


def _check(q, k, v, *, causal=True, xsa=False, softmax_scale=None, dz=None, q_gain=None, layout="bthd"):
    """Run ours and the float64 reference on the same inputs and upstream gradient; assert the bounds
    (with `q_gain`, on its gradient too)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v) + ((q_gain,) if q_gain is not None else ())]
    kw = dict(causal=causal, xsa=xsa, softmax_scale=softmax_scale, layout=layout)
    out = attention(*leaves[:3], q_gain=leaves[3] if q_gain is not None else None, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    if dz is None:
        dz = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dz)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.attention(*ref_in[:3], q_gain=ref_in[3] if q_gain is not None else None, **kw)
    ref_grads = torch.autograd.grad(ref, ref_in, dz.double())
    fwd_bound, grad_bound = BOUNDS[q.dtype]
    assert rel_err(out, ref) < fwd_bound, f"forward rel err {rel_err(out, ref):.2e}"
    for name, g, r, t in zip(("q", "k", "v", "q_gain"), grads, ref_grads, leaves):
        assert g.shape == r.shape and g.dtype == t.dtype
        assert rel_err(g, r) < grad_bound, f"d{name} rel err {rel_err(g, r):.2e}"
    return grads, ref_grads


# T not a multiple of the interpreter blocks (32 rows per program, 16 per step) and a multiple of them;
# G = 1 (MHA), 2, 4, 8; D = 46 (padded to a 64 tile), 52, 64, 128 and 16 (the minimum tile); every dtype.
CASES = [
    # B, T, H, Hkv, D, dtype, causal, xsa
    (2, 37, 4, 2, 46, torch.float32, True, True),
    (1, 80, 4, 1, 64, torch.float16, True, True),
    (2, 33, 2, 2, 64, torch.bfloat16, True, False),
    (1, 45, 4, 2, 46, torch.float32, False, True),
    (1, 64, 2, 1, 52, torch.bfloat16, True, True),
    (2, 24, 4, 4, 16, torch.float16, False, False),
    (1, 40, 8, 1, 128, torch.float32, True, True),
]


@pytest.mark.parametrize("B,T,H,Hkv,D,dtype,causal,xsa", CASES)
def test_matches_reference(B, T, H, Hkv, D, dtype, causal, xsa):
    torch.manual_seed(T * 131 + D)
    _check(*_inputs(B, T, H, Hkv, D, dtype), causal=causal, xsa=xsa)


# Tq < Tk: one new token after a cache, a chunk whose rows straddle the interpreter's 32/16 blocks and
# whose offset is not a multiple of them, non-causal, D = 46.
OFFSET_CASES = [
    # B, Tq, Tk, H, Hkv, D, causal, xsa
    (2, 1, 37, 4, 2, 16, True, True),
    (1, 20, 45, 4, 2, 16, True, True),
    (2, 5, 41, 4, 2, 16, False, False),
    (1, 9, 30, 4, 1, 46, True, True),
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,causal,xsa", OFFSET_CASES)
def test_queries_after_a_kv_cache_match_reference(B, Tq, Tk, H, Hkv, D, causal, xsa):
    """Query i at key position Tk - Tq + i (causal aligned bottom-right), XSA on v[:, Tk - Tq:]: forward
    and dq/dk/dv (cached keys get gradient through the queries that see them, cached values no XSA term)."""
    torch.manual_seed(Tq * 17 + Tk)
    _check(*_cached_inputs(B, Tq, Tk, H, Hkv, D, torch.float32), causal=causal, xsa=xsa)


def test_queries_after_a_cache_equal_the_last_rows_of_full_attention():
    """Attending the last Tq queries over all Tk keys gives the last Tq rows of full causal attention."""
    torch.manual_seed(6)
    q, k, v = _inputs(2, 40, 4, 2, 16, torch.float32)
    full = attention(q, k, v, xsa=True)
    assert torch.allclose(attention(q[:, 29:], k, v, xsa=True), full[:, 29:], rtol=1e-5, atol=1e-6)


def test_model_kv_cache_decoding_runs_the_op(monkeypatch):
    """CrawlerGPT decoding with a KVCache and ops="triton": chunked and one-token steps give the logits of
    one full forward, and those of the reference model."""
    for name in ("embed", "relu2_mlp", "softcapped_cross_entropy"):    # attention alone is under test
        monkeypatch.setattr(kernels, name, getattr(reference, name), raising=False)
    after_cache = []        # (Tq, Tk) of each Triton call whose queries trail cached keys

    def spy(q, k, v, **kw):
        if q.shape[1] < k.shape[1]:
            after_cache.append((q.shape[1], k.shape[1]))
        return attention(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention", spy)
    from crawler.decoding import KVCache  # not at module level: kernel test modules need torch + triton only
    model = filled_crawler(seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model.forward_logits(ids)
        model.ops = "triton"
        full = model.forward_logits(ids)
        cache, steps, start = KVCache(model.config, ids.shape[1]), [], 0
        for n in (5, 1, 6):
            steps.append(model.forward_logits(ids[:, start:start + n], cache))
            start += n
    assert rel_err(full, ref) < 1e-5
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    assert set(after_cache) == {(1, 6), (6, 12)}        # every schedule position of steps 2 and 3


# q_gain (H,): per-head score gains inside the kernel, forward and d q_gain, with GQA, after a KV cache,
# non-causal, and 16-bit inputs (the gain stays float32, as the models keep it).
GAIN_CASES = [
    # B, Tq, Tk, H, Hkv, D, dtype, causal, xsa
    (2, 37, 37, 4, 2, 46, torch.float32, True, True),
    (1, 9, 30, 4, 1, 16, torch.float32, True, False),
    (1, 33, 33, 2, 2, 16, torch.float32, False, True),
    (2, 20, 20, 4, 2, 16, torch.bfloat16, True, True),
]


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,dtype,causal,xsa", GAIN_CASES)
def test_q_gain_matches_reference(B, Tq, Tk, H, Hkv, D, dtype, causal, xsa):
    torch.manual_seed(Tq + H)
    q, k, v = _cached_inputs(B, Tq, Tk, H, Hkv, D, dtype)
    gain = torch.tensor([1.5, 5.0, 0.5, 2.5][:H])
    (dq, *_, dgain), _ = _check(q, k, v, causal=causal, xsa=xsa, q_gain=gain)
    assert dgain.dtype == torch.float32 and dgain.abs().min() > 0


def test_reference_q_gain_is_a_scale_of_q():
    """The reference's q_gain is q[:, :, h] · q_gain[h] before the dot (float64, to round-off)."""
    torch.manual_seed(8)
    q, k, v = (t.double() for t in _inputs(1, 12, 4, 2, 16, torch.float32))
    gain = torch.tensor([1.5, 5.0, 0.5, 2.5], dtype=torch.float64)
    assert rel_err(reference.attention(q, k, v, q_gain=gain, xsa=True),
                   reference.attention(q * gain[:, None], k, v, xsa=True)) < 1e-14


def test_sdpa_layout_matches_reference():
    """layout="bhtd": (B, H, T, D) in and out, forward and gradients (as transposed views, read in place)."""
    torch.manual_seed(9)
    q, k, v = (t.transpose(1, 2) for t in _inputs(2, 29, 4, 2, 46, torch.float32))
    _check(q, k, v, xsa=True, layout="bhtd", q_gain=torch.tensor([1.5, 5.0, 0.5, 2.5]))
    assert rel_err(attention(q, k, v, layout="bhtd"), attention(*(t.transpose(1, 2) for t in (q, k, v))
                                                                 ).transpose(1, 2)) == 0


@pytest.mark.parametrize("op", [attention, reference.attention], ids=["triton", "reference"])
@pytest.mark.parametrize("shapes, gain, layout", [
    (((2, 4, 12, 16), (2, 2, 12, 16)), None, "bthd"),       # GQA (B, H, T, D): Tq = 4 > Tk = 2 read as bthd
    (((2, 4, 3, 16), (2, 4, 12, 16)), None, "bthd"),        # MHA after a KV cache: 3 heads % 12 read as bthd
    (((2, 4, 12, 16), (2, 4, 12, 16)), 4, "bthd"),          # MHA, told apart by q_gain's length
    (((2, 12, 4, 16), (2, 12, 2, 16)), None, "bhtd"),       # and the other way round
])
def test_layout_guard_names_the_layout(op, shapes, gain, layout):
    q, k = (torch.randn(s) for s in shapes)
    other = "bhtd" if layout == "bthd" else "bthd"
    with pytest.raises(ValueError, match=f"pass layout='{other}'"):
        op(q, k, k.clone(), layout=layout, q_gain=None if gain is None else torch.ones(gain))


def test_layout_guard_cannot_tell_mha_without_a_cache():
    """MHA with Tq == Tk and no q_gain fits both layouts (docs/ops.md): accepted as the layout given."""
    q = torch.randn(1, 4, 12, 16)
    assert attention(q, q, q).shape == q.shape


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(layout="thd"), ValueError, "layout: expected one of"),
    (dict(q_gain=torch.ones(3)), ValueError, r"q_gain: expected shape \(4,\)"),
    (dict(q_gain=torch.ones(4, dtype=torch.int32)), TypeError, "q_gain: expected dtype"),
    (dict(q_gain=torch.ones(1, 4)), ValueError, "q_gain: expected a 1-D"),
])
def test_bad_gain_and_layout(kwargs, exc, match):
    q, k, v = _inputs(1, 8, 4, 2, 16, torch.float32)
    for op in (attention, reference.attention):
        with pytest.raises(exc, match=match):
            op(q, k, v, **kwargs)


def test_log_sum_exp_matches_reference():
    """return_lse: the float32 log-sum-exp of each row's scaled (and gained) scores, (B, H, Tq)."""
    torch.manual_seed(10)
    q, k, v = _cached_inputs(2, 9, 30, 4, 2, 16, torch.float32)
    gain = torch.tensor([1.5, 5.0, 0.5, 2.5])
    out, lse = attention(q, k, v, xsa=True, q_gain=gain, return_lse=True)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), xsa=True, q_gain=gain.double(),
                                       return_lse=True)
    assert lse.shape == ref_lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert rel_err(lse, ref_lse) < 1e-6 and rel_err(out, ref) < 1e-5


def test_zero_padded_heads_give_the_attention_padded_with_zeros():
    """The model's layout (docs/ops.md "Head dims"): heads zero-padded 46 -> 48 with the scale kept at
    1/sqrt(46) give the unpadded output and gradients in the first 46 columns and zeros in the pad."""
    from kernels.attention import padded_head_dim
    torch.manual_seed(11)
    D = 46
    width = padded_head_dim(D)
    q, k, v = _inputs(2, 21, 4, 2, D, torch.float32)
    gain = torch.tensor([1.5, 5.0, 0.5, 2.5])
    dz = torch.randn(q.shape)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    padded = attention(*(torch.nn.functional.pad(t, (0, width - D)) for t in leaves), xsa=True, q_gain=gain,
                       softmax_scale=D ** -0.5)
    grads = torch.autograd.grad(padded[..., :D], leaves, dz)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.attention(*ref_in, xsa=True, q_gain=gain.double())
    assert width == 48 and padded.shape[-1] == width and torch.equal(padded[..., D:], torch.zeros_like(padded[..., D:]))
    assert rel_err(padded[..., :D], ref) < 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref, ref_in, dz.double())):
        assert rel_err(g, r) < 1e-5


def test_xsa_value_norm_at_and_below_eps():
    """‖v‖ = 0 and 0 < ‖v‖ < 1e-12 rows: v̂ = v / 1e-12 (F.normalize's clamp), whose backward has no
    projection. The tiny row's dv is ~1e12 times the others, so the other rows are checked on their own."""
    torch.manual_seed(5)
    q, k, v = _inputs(1, 12, 4, 2, 16, torch.float32)
    v = v.clone()
    v[:, 3] = 0.0
    v[:, 7] *= 1e-13 / v[:, 7].norm(dim=-1, keepdim=True)
    grads, ref_grads = _check(q, k, v, xsa=True)
    others = [t for t in range(12) if t != 7]
    assert rel_err(grads[2][:, others], ref_grads[2][:, others]) < BOUNDS[torch.float32][1]


def test_softmax_scale_and_strided_upstream_gradient():
    """A non-default scale, and dz as a transposed (non-contiguous) view."""
    torch.manual_seed(1)
    q, k, v = _inputs(1, 29, 4, 2, 46, torch.float32)
    dz = torch.randn(1, 4, 29, 46).transpose(1, 2)
    _check(q, k, v, xsa=True, softmax_scale=0.37, dz=dz)


@pytest.mark.parametrize("xsa", [False, True])
def test_single_token(xsa):
    """T = 1: softmax over one key gives y = v, so dq = dk = 0; with XSA, z = v − (v·v̂)v̂ = 0 and dv = 0 too.
    Zero references are checked in absolute terms (their relative error is meaningless)."""
    torch.manual_seed(2)
    q, k, v = (t.detach().requires_grad_() for t in _inputs(2, 1, 4, 2, 46, torch.float32))
    out = attention(q, k, v, xsa=xsa)
    dz = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dz)
    zeros = [out, dq, dk, dv] if xsa else [dq, dk]
    for t in zeros:
        assert torch.isfinite(t).all() and t.abs().max() < 1e-5
    if not xsa:
        assert rel_err(out, v.repeat_interleave(2, dim=2)) < 1e-6
        assert rel_err(dv, dz.view(2, 1, 2, 2, 46).sum(3)) < 1e-6


@pytest.mark.parametrize("make, exc, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D"),
    (lambda q, k, v: (q, k[:, :, :1], v), ValueError, "k and v"),
    (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of KV heads"),
    (lambda q, k, v: (q[..., :15], k[..., :15], v[..., :15]), ValueError, "even"),
    (lambda q, k, v: (q.repeat(1, 1, 1, 4), k.repeat(1, 1, 1, 4), v.repeat(1, 1, 1, 4)), ValueError, "<= 128"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float64"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q: expected dtype"),
    (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k: expected a tensor on"),
    (lambda q, k, v: (q, k[:, :5], v[:, :5]), ValueError, "k: expected shape .* Tk >= 8"),
    (lambda q, k, v: (q, torch.cat((k, k)), torch.cat((v, v))), ValueError, r"k: expected shape \(1, Tk"),
])
def test_bad_inputs(make, exc, match):
    q, k, v = _inputs(1, 8, 4, 2, 46, torch.float32)
    with pytest.raises(exc, match=match):
        attention(*make(q, k, v))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_softmax_scale(scale):
    q, k, v = _inputs(1, 8, 4, 2, 46, torch.float32)
    with pytest.raises(ValueError, match="softmax_scale"):
        attention(q, k, v, softmax_scale=scale)


def _tiny_model_loss_and_grads(ops, ids, targets):
    from crawler import CrawlerConfig, CrawlerGPT  # not at module level (see KVCache above)
    torch.manual_seed(0)
    config = CrawlerConfig.preset("tiny", model_dim=64, num_heads=4, num_kv_heads=2, vocab_size=256,
                                  bigram_buckets=64, bigram_dim=16, ve_dim=16)
    model = CrawlerGPT(config, ops=ops)
    with torch.no_grad():   # the zero-init projections would hide attention from the loss
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss = model(ids, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_crawler_model_step_matches_reference(monkeypatch):
    """One training step of a tiny crawler with ops="triton" (our attention at every schedule position,
    XSA on all of them) vs ops="reference": the same loss and parameter gradients. The model's other ops
    run their references in both models, so this test is about attention alone (and stays fast)."""
    for name in ("embed", "relu2_mlp", "softcapped_cross_entropy"):
        monkeypatch.setattr(kernels, name, getattr(reference, name), raising=False)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 32), generator=gen)
    targets = torch.randint(0, 256, (2, 32), generator=gen)
    loss_t, grads_t = _tiny_model_loss_and_grads("triton", ids, targets)
    loss_r, grads_r = _tiny_model_loss_and_grads("reference", ids, targets)
    assert abs(loss_t.item() - loss_r.item()) < 1e-5 * abs(loss_r.item())
    assert grads_t.keys() == grads_r.keys()
    for name, g in grads_t.items():
        assert rel_err(g, grads_r[name]) < 1e-4, name


def test_compiles_fullgraph_aot_eager():
    """torch.compile(fullgraph=True) traces through the custom op (fake + autograd registered): forward
    and backward of a module that feeds linear-output views into attention, bitwise equal to eager."""
    torch.manual_seed(4)
    B, T, H, Hkv, D = 1, 20, 4, 2, 16
    qkv = torch.nn.Linear(32, (H + 2 * Hkv) * D)
    x = torch.randn(B, T, 32)

    def f(x):
        q, k, v = qkv(x).view(B, T, H + 2 * Hkv, D).split([H, Hkv, Hkv], dim=2)
        return attention(q, k, v, xsa=True).square().sum()

    eager = f(x)
    eager_grads = torch.autograd.grad(eager, list(qkv.parameters()))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    compiled_grads = torch.autograd.grad(compiled, list(qkv.parameters()))
    assert torch.equal(eager, compiled)
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# GPU: bf16 at the crawler's real shape (B·T = 64K tokens), and determinism
# ----------------------------------------------------------------------------------------------

def _reference_in_chunks(q, k, v, dz, xsa, chunk=2):
    """float64 reference forward + gradients, a few sequences at a time (the full (B, H, T, T) float64
    score tensor would not fit)."""
    outs, grads = [], [[], [], []]
    for s in range(0, q.shape[0], chunk):
        ins = [t[s:s + chunk].detach().double().requires_grad_() for t in (q, k, v)]
        out = reference.attention(*ins, causal=True, xsa=xsa)
        for acc, g in zip(grads, torch.autograd.grad(out, ins, dz[s:s + chunk].double())):
            acc.append(g)
        outs.append(out.detach())
    return torch.cat(outs), [torch.cat(g) for g in grads]


@pytest.mark.gpu
@pytest.mark.parametrize("D", [46, 64])
def test_gpu_bf16_real_shape(D):
    torch.manual_seed(D)
    q, k, v = (t.detach().requires_grad_() for t in _inputs(32, 2048, 16, 8, D, torch.bfloat16, device="cuda"))
    out = attention(q, k, v, xsa=True)
    dz = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dz)
    ref, ref_grads = _reference_in_chunks(q, k, v, dz, xsa=True)
    fwd_bound, grad_bound = BOUNDS[torch.bfloat16]
    assert rel_err(out, ref) < fwd_bound
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < grad_bound, f"d{name} rel err {rel_err(g, r):.2e}"


@pytest.mark.gpu
def test_gpu_bf16_real_shape_in_the_models_padded_layout():
    """pr1579's attention as the model launches it: heads of 46 zero-padded to 48 (16-byte aligned rows),
    scale 1/sqrt(46), per-head gains in the kernel; the first 46 columns against the unpadded reference."""
    torch.manual_seed(47)
    q, k, v = _inputs(32, 2048, 16, 8, 46, torch.bfloat16, device="cuda")
    gain = torch.linspace(1.0, 5.0, 16, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*(torch.nn.functional.pad(t, (0, 2)) for t in leaves), xsa=True, q_gain=gain,
                    softmax_scale=46 ** -0.5)[..., :46]
    dz = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dz)
    ref, ref_grads = _reference_in_chunks(q * gain[:, None].to(q.dtype), k, v, dz, xsa=True)
    fwd_bound, grad_bound = BOUNDS[torch.bfloat16]
    assert rel_err(out, ref) < fwd_bound
    ref_grads[0] = ref_grads[0] * gain.double()[:, None]              # the reference's q is q · gain
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) < grad_bound, f"d{name} rel err {rel_err(g, r):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("D", [46, 64])
def test_gpu_gradients_bitwise_deterministic(D):
    torch.manual_seed(D + 1)
    q, k, v = (t.detach().requires_grad_() for t in _inputs(32, 2048, 16, 8, D, torch.bfloat16, device="cuda"))
    dz = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    first = torch.autograd.grad(attention(q, k, v, xsa=True), (q, k, v), dz)
    for _ in range(2):
        again = torch.autograd.grad(attention(q, k, v, xsa=True), (q, k, v), dz)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
