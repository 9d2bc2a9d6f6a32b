"""kernels.relu2_mlp (fc + relu² fused in the matmul epilogue) against the float64 reference."""
import pytest
import torch
from conftest import rel_err

import kernels
from kernels import reference


def make_inputs(shape, d, hidden, *, dtype=torch.float32, weight_dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(*shape, d, generator=g).to(device=device, dtype=dtype)
    fc = (torch.randn(hidden, d, generator=g) / d ** 0.5).to(device=device, dtype=weight_dtype)
    proj = (torch.randn(d, hidden, generator=g) / hidden ** 0.5).to(device=device, dtype=weight_dtype)
    grad = torch.randn(*shape, d, generator=g).to(device=device, dtype=dtype)
    return h, fc, proj, grad


def run(fn, h, fc, proj, grad, negative_slope):
    """Output and gradients of fn on fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, fc, proj)]
    out = fn(*leaves, negative_slope)
    out.backward(grad)
    return (out, *(t.grad for t in leaves))


def reference64(h, fc, proj, grad, negative_slope):
    return run(reference.relu2_mlp, h.double(), fc.double(), proj.double(), grad.double(), negative_slope)


def assert_matches(got, ref, tol):
    for name, a, b in zip(("out", "dh", "d_fc", "d_proj"), got, ref):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("negative_slope", [0.0, 0.5])
@pytest.mark.parametrize("shape,d,hidden", [
    ((3, 15), 40, 70),     # d, hidden and tokens not multiples of the block
    ((70,), 32, 64),       # exact multiples
])
def test_matches_reference_fp32(negative_slope, shape, d, hidden):
    h, fc, proj, grad = make_inputs(shape, d, hidden, seed=len(shape))
    got = run(kernels.relu2_mlp, h, fc, proj, grad, negative_slope)
    assert got[0].shape == h.shape and got[0].dtype == h.dtype
    assert_matches(got, reference64(h, fc, proj, grad, negative_slope), 1e-5)


@pytest.mark.parametrize("negative_slope", [0.0, 0.5])
def test_bf16_h_fp32_weights(negative_slope):
    # The model under autocast: bf16 activations, fp32 master weights cast to bf16 inside the op.
    h, fc, proj, grad = make_inputs((2, 20), 48, 96, dtype=torch.bfloat16, seed=3)
    got = run(kernels.relu2_mlp, h, fc, proj, grad, negative_slope)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    assert_matches(got, reference64(h, fc, proj, grad, negative_slope), 2e-2)


def test_autocast_casts_like_the_reference():
    h, fc, proj, grad = make_inputs((33,), 40, 80, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(kernels.relu2_mlp, h, fc, proj, grad, 0.0)
        ref_dtype = reference.relu2_mlp(h, fc, proj).dtype
    assert got[0].dtype == ref_dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[1:])
    assert_matches(got, reference64(h, fc, proj, grad, 0.0), 2e-2)


def test_strided_weights_broadcast_grad_and_qat_weight():
    # fc given column-major, proj through a fake-quantisation STE expression (the model's QAT path),
    # and the upstream gradient of out.sum() is an expanded, stride-0 tensor.
    h, fc, proj, _ = make_inputs((25,), 40, 60, seed=5)
    fc_t = fc.T.contiguous().T
    scale = proj.abs().amax(1, keepdim=True) / 31
    leaves = [t.clone().requires_grad_() for t in (h, fc_t, proj)]
    got = kernels.relu2_mlp(leaves[0], leaves[1], leaves[2] + (torch.round(proj / scale) * scale - proj), 0.5)
    got.sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (h, fc, proj)]
    proj_q = (torch.round(proj / scale) * scale).double()
    ref = reference.relu2_mlp(ref_leaves[0], ref_leaves[1], ref_leaves[2] + (proj_q - ref_leaves[2].detach()), 0.5)
    ref.sum().backward()
    assert_matches((got, *(t.grad for t in leaves)), (ref, *(t.grad for t in ref_leaves)), 1e-5)


def test_no_tokens():
    h, fc, proj, _ = make_inputs((0,), 16, 32)
    leaves = [t.clone().requires_grad_() for t in (h, fc, proj)]
    out = kernels.relu2_mlp(*leaves)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert leaves[1].grad.abs().sum() == 0 and leaves[2].grad.abs().sum() == 0


def test_compiles_fullgraph_aot_eager():
    h, fc, proj, grad = make_inputs((2, 9), 24, 48, seed=6)

    def block(x, fc_w, proj_w, negative_slope):
        return x + kernels.relu2_mlp(torch.nn.functional.rms_norm(x, (x.shape[-1],)), fc_w, proj_w, negative_slope)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for slope in (0.0, 0.5):
        for a, b in zip(run(compiled, h, fc, proj, grad, slope), run(block, h, fc, proj, grad, slope)):
            assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("negative_slope", [0.0, 0.5])
def test_library_registration_opcheck(negative_slope):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library checks them.
    h, fc, proj, _ = make_inputs((8,), 16, 24, seed=8)
    torch.library.opcheck(torch.ops.crawler_kernels.relu2_mlp.default,
                          (h.requires_grad_(), fc.requires_grad_(), proj.requires_grad_(), negative_slope))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda h, fc, pj: (h.int(), fc, pj), TypeError, "h: expected dtype"),
    (lambda h, fc, pj: (h[0, 0, 0], fc, pj), ValueError, "h: expected a tensor of shape"),
    (lambda h, fc, pj: (h, fc[:, :-1], pj), ValueError, r"fc_weight: expected shape \(hidden, 8\)"),
    (lambda h, fc, pj: (h, fc[None], pj), ValueError, "fc_weight: expected a 2-D tensor"),
    (lambda h, fc, pj: (h, fc, pj.T), ValueError, r"proj_weight: expected shape \(8, 12\)"),
    (lambda h, fc, pj: (h, fc, pj.long()), TypeError, "proj_weight: expected dtype"),
    (lambda h, fc, pj: (h, fc.to("meta"), pj), ValueError, "fc_weight: expected a tensor on cpu"),
])
def test_bad_inputs(bad, exc, match):
    h, fc, proj, _ = make_inputs((2, 3), 8, 12)
    with pytest.raises(exc, match=match):
        kernels.relu2_mlp(*bad(h, fc, proj))


@pytest.mark.parametrize("negative_slope", [float("nan"), float("inf"), "0.5", True])
def test_bad_negative_slope(negative_slope):
    h, fc, proj, _ = make_inputs((2,), 8, 12)
    with pytest.raises(ValueError, match="negative_slope: expected a finite number"):
        kernels.relu2_mlp(h, fc, proj, negative_slope)


@pytest.mark.gpu
@pytest.mark.parametrize("negative_slope", [0.0, 0.5])
def test_gpu_bf16_realistic_shape(negative_slope):
    """bf16 activations, fp32 weights, 8192 tokens, 736 -> 2944 -> 736, against the float64 reference."""
    h, fc, proj, grad = make_inputs((8192,), 736, 2944, dtype=torch.bfloat16, device="cuda", seed=7)
    got = run(kernels.relu2_mlp, h, fc, proj, grad, negative_slope)
    assert_matches(got, reference64(h, fc, proj, grad, negative_slope), 2e-2)
