"""kernels.flash_attn_interface: FA3's `flash_attn_func` / `flash_attn_varlen_func` on our kernel, against the
float64 reference, with the argument patterns of the PR #1530 varlen record (../shared/reference/pg): its
own attention module run through our functions (padded cu_seqlens with repeated ends from its own
`_build_cu_seqlens`, the (1, total, H, D) view, GQA 8/4, XSA applied after), our xsa= / q_gain= folding the
record's surrounding passes into the kernel, FA3's return convention (the log-sum-exp when asked), and
every FA3 argument we do not serve refused by name. Triton runs under the interpreter on a CPU."""
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from kernels import flash_attn_interface as fai
from kernels import reference

# The record script: ../shared/reference/pg beside the checkout (or beside any folder above it: worktrees).
RECORD = next((d / "shared/reference/pg/varlen_record_1530_train_gpt.py" for d in Path(__file__).resolve().parents[1:]
               if (d / "shared/reference/pg/varlen_record_1530_train_gpt.py").exists()),
              Path("../shared/reference/pg/varlen_record_1530_train_gpt.py"))
H, HKV, D = 8, 4, 16          # the record's GQA group (8 query / 4 KV heads) at a small head dim

# FA3's signatures (Dao-AILab/flash-attention, hopper/flash_attn_interface.py): names in positional order.
FA3_FUNC = ["q", "k", "v", "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size",
            "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs"]
FA3_VARLEN = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "seqused_q", "seqused_k",
              "softmax_scale", "causal", "qv", "q_descale", "k_descale", "v_descale", "window_size",
              "attention_chunk", "softcap", "num_splits", "pack_gqa", "deterministic", "sm_margin", "return_attn_probs"]


@pytest.fixture(scope="module")
def record():
    """The record's train_gpt.py imported as a module, its `flash_attn_interface` being ours."""
    if not RECORD.exists():
        pytest.skip(f"{RECORD} not present")
    saved = sys.modules.get("flash_attn_interface")
    sys.modules["flash_attn_interface"] = fai
    try:
        spec = importlib.util.spec_from_file_location("record_1530_train_gpt", RECORD)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("flash_attn_interface")
        else:
            sys.modules["flash_attn_interface"] = saved
    return module


def _reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, **_):
    return reference.attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens_q)


def _reference_dense(q, k, v, causal=False, **_):
    return reference.attention(q, k, v, causal=causal)


def _record_attention_step(record, monkeypatch, dtype, bos, total, fa_funcs):
    """The record's CausalSelfAttention forward (XSA on) on one packed batch of `total` tokens with BOS at
    `bos` (varlen) or as a dense (2, total / 2) batch (bos None), its FA3 calls bound to `fa_funcs`:
    the output and the gradients of x, the four weights and q_gain."""
    torch.manual_seed(0)
    attn = record.CausalSelfAttention(H * D, H, HKV, rope_base=10000.0, qk_gain_init=5.0, train_seq_len=total)
    attn.use_xsa = True
    with torch.no_grad():
        attn.q_gain.add_(torch.randn(H) * 0.5)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, H * D, generator=g) * (H * D) ** -0.5 for n in (H * D, HKV * D, HKV * D, H * D)]
    x = torch.randn(1, total, H * D, generator=g)
    kw = {}
    if bos is not None:
        cu, max_seqlen = record._build_cu_seqlens(bos, total, "cpu", bucket_size=8)
        kw = dict(cu_seqlens=cu, max_seqlen=max_seqlen)
    else:
        x = x.reshape(2, total // 2, H * D)
    attn = attn.to(dtype)
    leaves = [t.to(dtype).requires_grad_() for t in [x, *weights]] + [attn.q_gain]
    for name, fn in zip(("flash_attn_varlen_func", "flash_attn_3_func"), fa_funcs):
        monkeypatch.setattr(record, name, fn)
    out = attn(*leaves[:5], **kw)
    dz = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    return out, torch.autograd.grad(out, leaves, dz)


@pytest.mark.parametrize("bos", [[0, 7, 19, 20, 36], None], ids=["varlen", "dense"])
def test_the_records_attention_runs_on_our_interface(record, monkeypatch, bos):
    """Padded cu_seqlens (repeated ends to a multiple of 8), q[0] / [None] around the varlen call,
    window_size=(-1, -1) passed, GQA 8/4, XSA and q_gain applied around it: ours in float32 against the
    same module in float64 with the reference as its FA3, forward and every gradient."""
    ours = _record_attention_step(record, monkeypatch, torch.float32, bos, 40,
                                  (fai.flash_attn_varlen_func, fai.flash_attn_func))
    ref = _record_attention_step(record, monkeypatch, torch.float64, bos, 40, (_reference_varlen, _reference_dense))
    assert rel_err(ours[0], ref[0]) < 1e-5
    for name, g, r in zip(("x", "q_w", "k_w", "v_w", "out_w", "q_gain"), ours[1], ref[1]):
        assert rel_err(g, r) < 1e-5, name


def _packed(total, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, n, D, generator=g).to(dtype) for n in (H, HKV, HKV)]


def test_xsa_and_q_gain_fold_the_records_passes_into_the_kernel(record):
    """flash_attn_varlen_func(xsa=True, q_gain=g) equals the record's pattern (q * g, FA3, then its own
    _xsa_efficient) run on the float64 reference: forward, dq/dk/dv, d q_gain, and the lse; the
    (1, total, H, D) form gives the same rows, its lse (1, H, total)."""
    cu, max_seqlen = record._build_cu_seqlens([0, 11, 12, 30], 40, "cpu", bucket_size=8)
    gain = torch.linspace(0.5, 5.0, H)
    leaves = [t.requires_grad_() for t in _packed(40, seed=3) + [gain.clone()]]
    kw = dict(causal=True, xsa=True, q_gain=leaves[3], return_attn_probs=True)
    out, lse = fai.flash_attn_varlen_func(*leaves[:3], cu, cu, max_seqlen, max_seqlen, **kw)
    assert out.shape == leaves[0].shape and lse.shape == (H, 40)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    with torch.no_grad():
        out1, lse1 = fai.flash_attn_varlen_func(*(t[None] for t in leaves[:3]), cu, cu, max_seqlen, max_seqlen, **kw)
    assert torch.equal(out1[0], out) and torch.equal(lse1[0], lse) and lse1.shape == (1, H, 40)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    qg = ref_in[0] * ref_in[3][:, None]
    y, ref_lse = reference.attention(qg, ref_in[1], ref_in[2], cu_seqlens=cu, return_lse=True)
    ref = record.CausalSelfAttention._xsa_efficient(None, y[None], ref_in[2][None])[0]
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-6
    dz = torch.randn(40, H, D, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(out, leaves, dz)
    for name, g, r in zip(("q", "k", "v", "q_gain"), grads, torch.autograd.grad(ref, ref_in, dz.double())):
        assert rel_err(g, r) < 1e-5, name


def test_dense_returns_out_or_out_and_lse():
    """FA3's convention: out alone by default; (out, lse (B, H, Tq) float32) with return_attn_probs."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 20, n, D, generator=g) for n in (H, HKV, HKV))
    out = fai.flash_attn_func(q, k, v, 0.3, True)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), softmax_scale=0.3, return_lse=True)
    assert isinstance(out, torch.Tensor) and rel_err(out, ref) < 1e-5
    out2, lse = fai.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_attn_probs=True)
    assert torch.equal(out2, out) and lse.shape == (2, H, 20) and rel_err(lse, ref_lse) < 1e-6


def test_signatures_are_fa3s():
    """FA3's argument names in FA3's positions (a positional call means the same thing), ours keyword-only."""
    for fn, names in ((fai.flash_attn_func, FA3_FUNC), (fai.flash_attn_varlen_func, FA3_VARLEN)):
        params = inspect.signature(fn).parameters.values()
        assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == names
        assert [p.name for p in params if p.kind == p.KEYWORD_ONLY] == ["xsa", "q_gain"]


UNSERVED = [("qv", torch.zeros(1)), ("q_descale", torch.ones(1)), ("k_descale", torch.ones(1)),
            ("v_descale", torch.ones(1)), ("window_size", (128, 0)), ("attention_chunk", 64), ("softcap", 30.0),
            ("num_splits", 2), ("pack_gqa", True), ("sm_margin", 4)]


@pytest.mark.parametrize("name, value", UNSERVED + [("seqused_q", torch.ones(1)), ("seqused_k", torch.ones(1))])
def test_unserved_fa3_arguments_are_refused_by_name(name, value):
    q, k, v = _packed(12, seed=6)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"flash_attn_varlen_func: {name}="):
        fai.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True, **{name: value})
    if not name.startswith("seqused"):
        with pytest.raises(ValueError, match=f"flash_attn_func: {name}="):
            fai.flash_attn_func(q[None], k[None], v[None], causal=True, **{name: value})


def test_different_key_offsets_and_fp8_are_refused():
    q, k, v = _packed(12, seed=7)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected the same offsets"):
        fai.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 6, 12], dtype=torch.int32), 7, 7)
    with pytest.raises(ValueError, match="cu_seqlens_k: expected the same offsets"):
        fai.flash_attn_varlen_func(q, k, v, cu, cu[:2], 7, 7)
    out = fai.flash_attn_varlen_func(q, k, v, cu, cu.clone(), 7, 7, window_size=[-1, -1], deterministic=True)
    assert out.shape == q.shape
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="q: expected dtype"):
            fai.flash_attn_func(*(t[None].to(torch.float8_e4m3fn) for t in (q, k, v)))
