"""kernels.softcapped_cross_entropy (fused softcapped tied-head CE) against the float64 reference."""
import pytest
import torch
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
def test_gpu_weight_gradient_is_deterministic(monkeypatch):
    monkeypatch.setattr(ce, "DLOGITS_CHUNK_BYTES", 2048 * 8192 * 2)   # four chunks
    hidden, weight, targets = make_inputs(8192, 736, 8192, dtype=torch.bfloat16, device="cuda", seed=9)
    first = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    second = run(kernels.softcapped_cross_entropy, hidden, weight, targets)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
