"""kernels.softcapped_cross_entropy (fused softcapped tied-head CE) and
kernels.softcapped_cross_entropy_from_logits against the float64 reference and F.cross_entropy: every
reduction, ignore_index (some tokens, all of them), the loss dtype, bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import kernels
import kernels.cross_entropy as ce
from kernels import reference

SOFTCAP = 30.0


def make_inputs(N, d, V, *, dtype=torch.float32, weight_dtype=None, scale=1.0, device="cpu", seed=0):
    """Random hidden/weight/targets; targets hit both ends of the vocabulary (0 and V-1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = (torch.randn(N, d, generator=g) * scale).to(device=device, dtype=dtype)
    weight = torch.randn(V, d, generator=g).to(device=device, dtype=weight_dtype or dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0], targets[-1] = 0, V - 1
    return hidden, weight, targets.to(device)


def run(fn, hidden, weight, targets, softcap=SOFTCAP):
    """Loss and gradients of fn on fresh leaf copies of hidden/weight."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, softcap)
    loss.backward()
    return loss, h.grad, w.grad


def reference64(hidden, weight, targets, softcap=SOFTCAP):
    return run(reference.softcapped_cross_entropy, hidden.double(), weight.double(), targets, softcap)


def assert_matches(out, ref, tol_loss, tol_grad):
    loss, dh, dw = out
    loss_ref, dh_ref, dw_ref = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss_ref.item()) <= tol_loss * abs(loss_ref.item())
    assert rel_err(dh, dh_ref) < tol_grad, rel_err(dh, dh_ref)
    assert rel_err(dw, dw_ref) < tol_grad, rel_err(dw, dw_ref)


@pytest.mark.parametrize("N,d,V", [
    (37, 40, 150),    # one token tile: the vocabulary is split over programs, partial LSEs merged
    (130, 24, 67),    # several token tiles, one vocabulary range; d and V not multiples of the block
])
def test_matches_reference_fp32(N, d, V):
    hidden, weight, targets = make_inputs(N, d, V, scale=3.0)
    out = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    assert out[1].dtype == hidden.dtype and out[2].dtype == weight.dtype
    assert_matches(out, reference64(hidden, weight, targets), 1e-6, 1e-5)


def test_large_logits_saturating_at_the_softcap():
    # |logit/softcap| up to ~10: tanh saturates, its derivative is tiny, and z sits near ±softcap.
    hidden, weight, targets = make_inputs(40, 32, 100, scale=6.0, seed=1)
    softcap = 5.0
    assert (hidden.double() @ weight.double().T).abs().max() > 8 * softcap
    out = run(kernels.softcapped_cross_entropy, hidden, weight, targets, softcap)
    assert_matches(out, reference64(hidden, weight, targets, softcap), 1e-6, 1e-5)


def test_backward_in_several_token_chunks(monkeypatch):
    # Chunks of 16 tokens: dh rows come from different chunks, dW sums chunks in order.
    N, d, V = 70, 24, 90
    monkeypatch.setattr(ce, "DLOGITS_CHUNK_BYTES", 16 * V * 4)
    hidden, weight, targets = make_inputs(N, d, V, seed=2)
    out = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    assert_matches(out, reference64(hidden, weight, targets), 1e-6, 1e-5)


def test_bf16_weight_fp32_hidden():
    # The seed's tok_emb is bf16: it is cast to the hidden dtype; its gradient comes back in bf16.
    hidden, weight, targets = make_inputs(33, 40, 70, weight_dtype=torch.bfloat16, seed=3)
    loss, dh, dw = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    assert dw.dtype == torch.bfloat16
    assert_matches((loss, dh, dw), reference64(hidden, weight, targets), 1e-6, 1e-2)


def test_bf16_inputs_and_autocast():
    hidden, weight, targets = make_inputs(33, 40, 70, dtype=torch.bfloat16, seed=4)
    ref = reference64(hidden, weight, targets)
    assert_matches(run(kernels.softcapped_cross_entropy, hidden, weight, targets), ref, 1e-3, 2e-2)
    # Under autocast fp32 inputs are cast to bf16 first (like the reference's F.linear); grads come back fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, dh, dw = run(kernels.softcapped_cross_entropy, hidden.float(), weight.float(), targets)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert_matches((loss, dh, dw), ref, 1e-3, 2e-2)


def test_strided_inputs_and_int32_targets():
    hidden, weight, targets = make_inputs(29, 60, 50, seed=5)
    h_strided = hidden[:, ::2]                  # row stride 60, column stride 2
    w_t = weight[:, :30].T.contiguous().T       # column-major (V, d)
    assert not h_strided.is_contiguous() and not w_t.is_contiguous()
    out = run(kernels.softcapped_cross_entropy, h_strided, w_t, targets.int())
    assert_matches(out, reference64(h_strided, w_t, targets), 1e-6, 1e-5)


def test_compiles_fullgraph_aot_eager():
    hidden, weight, targets = make_inputs(20, 16, 40, seed=6)

    def loss_fn(h, w, t, softcap):
        return 2.0 * kernels.softcapped_cross_entropy(torch.tanh(h), w, t, softcap)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    eager = run(loss_fn, hidden, weight, targets)
    got = run(compiled, hidden, weight, targets)
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-6


def test_library_registration_opcheck():
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library checks them.
    hidden, weight, targets = make_inputs(8, 16, 20, seed=10)
    torch.library.opcheck(torch.ops.crawler_kernels.softcapped_cross_entropy.default,
                          (hidden.requires_grad_(), weight.requires_grad_(), targets, SOFTCAP, -100))


def test_from_logits_library_registration_opcheck():
    hidden, weight, targets = make_inputs(8, 16, 20, seed=10)
    targets[3] = -100
    torch.library.opcheck(torch.ops.crawler_kernels.softcapped_cross_entropy_from_logits.default,
                          ((hidden @ weight.T).requires_grad_(), targets, SOFTCAP, -100))


def softcapped(logits, softcap=SOFTCAP):
    return softcap * torch.tanh(logits / softcap)


# Each variant as a function of (hidden, weight): the logits variants get hidden @ weight.T, computed by
# torch in the inputs' dtype, so their gradients reach hidden and weight through that matmul.
VARIANTS = {
    "fused": lambda h, w, t, **kw: kernels.softcapped_cross_entropy(h, w, t, SOFTCAP, **kw),
    "fused-from-logits": lambda h, w, t, **kw: kernels.softcapped_cross_entropy_from_logits(h @ w.T, t, SOFTCAP,
                                                                                           **kw),
    "reference": lambda h, w, t, **kw: reference.softcapped_cross_entropy(h, w, t, SOFTCAP, **kw),
    "reference-from-logits": lambda h, w, t, **kw: reference.softcapped_cross_entropy_from_logits(
        h @ w.T, t, SOFTCAP, **kw),
}
# Float64 agreement with F.cross_entropy: the fused tied head computes its float64 inputs in fp32 tiles;
# the others compute in float64 throughout.
FLOAT64_TOL = {"fused": (1e-6, 1e-5), "fused-from-logits": (1e-12, 1e-12), "reference": (1e-13, 1e-13),
               "reference-from-logits": (1e-13, 1e-13)}


def loss_and_grads(fn, hidden, weight, targets, upstream, **kw):
    """fn's loss and the gradients of Σ upstream · loss in hidden and weight (fresh leaves)."""
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    dh, dw = torch.autograd.grad(loss, (h, w), upstream.to(loss.dtype).expand(loss.shape))
    return loss, dh, dw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reductions_with_ignore_index_match_F_cross_entropy_float64(variant, reduction):
    # 37 tokens: one token tile, so the fused tied head also splits the vocabulary (150, not a block multiple).
    hidden, weight, targets = make_inputs(37, 24, 150, dtype=torch.float64, scale=3.0, seed=11)
    targets[::4] = -100
    g = torch.Generator().manual_seed(12)
    upstream = torch.randn(37 if reduction == "none" else (), generator=g, dtype=torch.float64)
    got = loss_and_grads(VARIANTS[variant], hidden, weight, targets, upstream, reduction=reduction)
    expect = loss_and_grads(lambda h, w, t, **kw: F.cross_entropy(softcapped(h @ w.T), t, **kw),
                            hidden, weight, targets, upstream, reduction=reduction)
    assert got[0].dtype == torch.float64 and got[0].shape == expect[0].shape
    tol_loss, tol_grad = FLOAT64_TOL[variant]
    assert rel_err(got[0], expect[0]) < tol_loss, rel_err(got[0], expect[0])
    if reduction == "none":
        assert torch.equal(got[0][::4], torch.zeros(10, dtype=torch.float64))      # ignored: exactly 0
    for a, b in zip(got[1:], expect[1:]):
        assert rel_err(a, b) < tol_grad, rel_err(a, b)


@pytest.mark.parametrize("variant", ["fused", "fused-from-logits"])
def test_all_ignored_and_ignore_index_inside_the_vocabulary(variant):
    """Every target ignored (ignore_index = 5, a real class): "mean" is NaN, "sum" 0, "none" zeros, as
    F.cross_entropy gives, and every gradient is exactly 0 (not NaN). Then only the targets equal to 0 are
    ignored (ignore_index = 0)."""
    hidden, weight, targets = make_inputs(20, 16, 40, seed=13)
    all_ignored = torch.full_like(targets, 5)
    for reduction, expect in (("mean", float("nan")), ("sum", 0.0), ("none", 0.0)):
        loss, dh, dw = loss_and_grads(VARIANTS[variant], hidden, weight, all_ignored, torch.tensor(1.0),
                                      reduction=reduction, ignore_index=5)
        torch.testing.assert_close(loss, torch.full_like(loss, expect), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    targets[5:9] = 0
    got = loss_and_grads(VARIANTS[variant], hidden, weight, targets, torch.tensor(1.0), ignore_index=0)
    expect = loss_and_grads(lambda h, w, t, **kw: F.cross_entropy(softcapped(h.double() @ w.double().T), t, **kw),
                            hidden, weight, targets, torch.tensor(1.0), ignore_index=0)
    for a, b in zip(got, expect):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)


def test_loss_dtype_bf16_and_strided_logits():
    """The loss is float32 for 16/32-bit inputs and float64 for float64 ones (op and reference alike);
    bf16 logits are read as they are (their gradient comes back bf16), and any strides are read in place."""
    hidden, weight, targets = make_inputs(30, 16, 70, seed=14)
    for fn in (kernels.softcapped_cross_entropy, reference.softcapped_cross_entropy):
        assert fn(hidden.bfloat16(), weight, targets, SOFTCAP).dtype == torch.float32
        assert fn(hidden.double(), weight.double(), targets, SOFTCAP).dtype == torch.float64
    logits = (weight @ hidden.T).T.bfloat16()                       # (30, 70) with strides (1, 30)
    assert not logits.is_contiguous()
    x = logits.detach().requires_grad_()
    losses = kernels.softcapped_cross_entropy_from_logits(x, targets, SOFTCAP, reduction="none")
    losses.sum().backward()
    x64 = logits.double().requires_grad_()
    expect = F.cross_entropy(softcapped(x64), targets, reduction="none")
    expect.sum().backward()
    assert losses.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert rel_err(losses, expect) < 1e-6 and rel_err(x.grad, x64.grad) < 1e-2


def test_new_arguments_compile_fullgraph_and_reach_the_module():
    hidden, weight, targets = make_inputs(20, 16, 40, seed=15)
    targets[::3] = -1

    def losses(h, w, t):
        per_token = kernels.softcapped_cross_entropy(h, w, t, SOFTCAP, reduction="none", ignore_index=-1)
        return per_token.sum() + kernels.softcapped_cross_entropy_from_logits(h @ w.T, t, SOFTCAP, ignore_index=-1)

    compiled = torch.compile(losses, backend="aot_eager", fullgraph=True)
    upstream = torch.tensor(1.0)
    for a, b in zip(loss_and_grads(compiled, hidden, weight, targets, upstream),
                    loss_and_grads(losses, hidden, weight, targets, upstream)):
        assert rel_err(a, b) < 1e-6
    module = kernels.SoftcappedCrossEntropyLoss(SOFTCAP, reduction="none", ignore_index=-1)
    per_position = module(hidden.reshape(4, 5, 16), weight, targets.reshape(4, 5))
    assert per_position.shape == (4, 5)
    assert torch.equal(per_position.reshape(-1),
                       kernels.softcapped_cross_entropy(hidden, weight, targets, SOFTCAP, reduction="none",
                                                        ignore_index=-1))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda h, w, t: (h, w, t.clone().fill_(-1)), ValueError, r"targets: expected class indices in \[0, 50\)"),
    (lambda h, w, t: (h, w, t.clone().fill_(50)), ValueError, r"targets: .*got values in \[50, 50\]"),
    (lambda h, w, t: (h, w, t.float()), TypeError, "targets: expected dtype"),
    (lambda h, w, t: (h, w, t[:-1]), ValueError, r"targets: expected shape \(12,\)"),
    (lambda h, w, t: (h[None], w, t), ValueError, "hidden: expected a 2-D tensor"),
    (lambda h, w, t: (h.int(), w, t), TypeError, "hidden: expected dtype"),
    (lambda h, w, t: (h, w[:, :-1], t), ValueError, r"weight: expected shape \(V, 8\)"),
    (lambda h, w, t: (h, w.to("meta"), t), ValueError, "weight: expected a tensor on cpu"),
    (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden: expected at least one token"),
])
def test_bad_inputs(bad, exc, match):
    hidden, weight, targets = make_inputs(12, 8, 50, seed=7)
    with pytest.raises(exc, match=match):
        kernels.softcapped_cross_entropy(*bad(hidden, weight, targets), SOFTCAP)


@pytest.mark.parametrize("fn", [kernels.softcapped_cross_entropy_from_logits,
                                reference.softcapped_cross_entropy_from_logits])
@pytest.mark.parametrize("bad,exc,match", [
    (lambda x, t, kw: (x, t.clone().fill_(-5), kw), ValueError,
     r"targets: expected class indices in \[0, 50\) or ignore_index -100, got values in \[-5, -5\]"),
    (lambda x, t, kw: (x, t, {"reduction": "avg"}), ValueError, "reduction: expected one of"),
    (lambda x, t, kw: (x, t, {"ignore_index": 1.5}), ValueError, "ignore_index: expected an int"),
    (lambda x, t, kw: (x[0], t, kw), ValueError, "logits: expected a 2-D tensor"),
    (lambda x, t, kw: (x[:, :0], t, kw), ValueError, r"logits: expected shape \(N, V\) with N, V >= 1"),
    (lambda x, t, kw: (x, t[:-1], kw), ValueError, r"targets: expected shape \(12,\) to match logits"),
    (lambda x, t, kw: (x.int(), t, kw), TypeError, "logits: expected dtype"),
])
def test_from_logits_bad_inputs(fn, bad, exc, match):
    hidden, weight, targets = make_inputs(12, 8, 50, seed=7)
    logits, targets, kw = bad(hidden @ weight.T, targets, {})
    with pytest.raises(exc, match=match):
        fn(logits, targets, SOFTCAP, **kw)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan"), "30"])
def test_bad_softcap(softcap):
    hidden, weight, targets = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="softcap: expected a finite number > 0"):
        kernels.softcapped_cross_entropy(hidden, weight, targets, softcap)


@pytest.mark.gpu
def test_gpu_bf16_realistic_shape():
    """bf16 at a real shape (8192 tokens, d 736, V 8192) against the float64 reference."""
    hidden, weight, targets = make_inputs(8192, 736, 8192, dtype=torch.bfloat16, device="cuda", seed=8)
    out = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    assert_matches(out, reference64(hidden, weight, targets), 1e-3, 2e-2)


@pytest.mark.gpu
def test_gpu_from_logits_and_per_token_losses():
    """From bf16 logits (8192 × 8192, a tenth of the targets ignored) and the tied head's per-token
    losses, against the float64 reference."""
    hidden, weight, targets = make_inputs(8192, 736, 8192, dtype=torch.bfloat16, device="cuda", seed=16)
    targets[::10] = -100
    logits = (hidden @ weight.T).requires_grad_()
    loss = kernels.softcapped_cross_entropy_from_logits(logits, targets, SOFTCAP)
    loss.backward()
    logits64 = logits.detach().double().requires_grad_()
    expect = reference.softcapped_cross_entropy_from_logits(logits64, targets, SOFTCAP)
    expect.backward()
    assert rel_err(loss, expect) < 1e-6 and rel_err(logits.grad, logits64.grad) < 1e-2
    per_token = kernels.softcapped_cross_entropy(hidden, weight, targets, SOFTCAP, reduction="none")
    expect = reference.softcapped_cross_entropy(hidden.double(), weight.double(), targets, SOFTCAP,
                                                reduction="none")
    assert rel_err(per_token, expect) < 1e-2


@pytest.mark.gpu
def test_gpu_weight_gradient_is_deterministic(monkeypatch):
    monkeypatch.setattr(ce, "DLOGITS_CHUNK_BYTES", 2048 * 8192 * 2)   # four chunks
    hidden, weight, targets = make_inputs(8192, 736, 8192, dtype=torch.bfloat16, device="cuda", seed=9)
    first = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    second = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
