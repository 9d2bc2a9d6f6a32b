"""The GPTQ + SDClip reference (kernels.reference.gptq_quantize, docs/math.md §3): it must beat round-to-nearest
on the proxy loss tr((W-Ŵ)H(W-Ŵ)ᵀ), reduce to it when H carries no correlations, handle dead columns and
near-singular Hessians, keep codes on the grid, follow the SDClip scale rule, and reject bad input."""
import math

import pytest
import torch
from conftest import correlated_hessian

from kernels import reference as ref


def _weight(N, K, seed=1, std=0.037, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g, dtype=torch.float64) * std).to(dtype)


def _proxy(W, H, codes, scales):
    return float(ref.quantization_proxy_loss(W, H, codes, scales))


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("K", [96, 200])
def test_gptq_beats_round_to_nearest_on_correlated_hessian(act_order, K):
    W, H = _weight(48, K), correlated_hessian(K, seed=K)
    codes, scales = ref.gptq_quantize(W, H, block_size=32, act_order=act_order)
    rtn = ref.quantize_rtn(W, scales)
    assert _proxy(W, H, codes, scales) < 0.5 * _proxy(W, H, rtn, scales)


def test_act_order_helps_on_correlated_hessian():
    W, H = _weight(64, 160), correlated_hessian(160, seed=3)
    losses = {ao: _proxy(W, H, *ref.gptq_quantize(W, H, block_size=32, act_order=ao)) for ao in (True, False)}
    assert losses[True] < losses[False]


@pytest.mark.parametrize("act_order", [False, True])
def test_isotropic_hessian_gives_round_to_nearest_codes(act_order):
    # H = c·I: U is diagonal, so no error is propagated; with equal diag entries the stable act-order sort
    # is the identity permutation.
    W = _weight(32, 100)
    codes, scales = ref.gptq_quantize(W, 2.5 * torch.eye(100), block_size=32, act_order=act_order)
    assert torch.equal(codes, ref.quantize_rtn(W, scales))
    assert torch.equal(scales, ref.sdclip_scales(W))


def test_block_size_does_not_change_the_result():
    # The lazy block update is an exact reorganisation of the column-by-column algorithm.
    W, H = _weight(48, 150), correlated_hessian(150, seed=5)
    c_small, s = ref.gptq_quantize(W, H, block_size=16)
    c_one, _ = ref.gptq_quantize(W, H, block_size=150)
    assert (c_small != c_one).float().mean() <= 1e-3
    assert _proxy(W, H, c_small, s) == pytest.approx(_proxy(W, H, c_one, s), rel=5e-3)


@pytest.mark.parametrize("act_order", [True, False])
def test_dead_columns_quantise_to_zero(act_order):
    K, dead = 120, [0, 7, 50, 119]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(512, K, generator=g) @ torch.randn(K, K, generator=g)
    x[:, dead] = 0                                         # inputs that never fire: H row/col j = 0
    H = x.T @ x / 512
    W = _weight(40, K)
    W[:, dead] = 0.1                                       # would quantise to nonzero codes if live
    codes, scales = ref.gptq_quantize(W, H, block_size=32, act_order=act_order)
    assert (codes[:, dead] == 0).all()
    live = [j for j in range(K) if j not in dead]
    assert (codes[:, live] != 0).any()
    assert _proxy(W, H, codes, scales) < _proxy(W, H, ref.quantize_rtn(W, scales), scales)


def test_all_dead_hessian_gives_zero_codes():
    codes, _ = ref.gptq_quantize(_weight(8, 40), torch.zeros(40, 40), block_size=16)
    assert (codes == 0).all()


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
def test_codes_on_the_grid(bits):
    R = 2 ** (bits - 1) - 1
    W, H = _weight(32, 96) * torch.linspace(0.1, 10, 32)[:, None], correlated_hessian(96, seed=bits)
    W[3, 5] = 5.0                                          # an outlier far beyond the SDClip range
    codes, scales = ref.gptq_quantize(W, H, bits=bits, clip_sigmas=3.0, block_size=32)
    assert codes.dtype == torch.int8 and codes.shape == W.shape
    assert scales.dtype == torch.float16 and scales.shape == (32,)
    assert int(codes.abs().max()) == R                     # clipping reaches the grid's edge, not beyond
    assert int(codes[3, 5]) == R


def test_float64_and_half_inputs():
    W, H = _weight(16, 64), correlated_hessian(64, seed=2)
    c32, s32 = ref.gptq_quantize(W, H, block_size=32)
    c64, s64 = ref.gptq_quantize(W.double(), H.double(), block_size=32)
    assert s64.dtype == torch.float16 and (c32 != c64).float().mean() <= 0.01
    c16, _ = ref.gptq_quantize(W.half(), H, block_size=32)
    assert c16.dtype == torch.int8 and c16.shape == W.shape


# ----------------------------------------------------------------------------------------------
# SDClip scales, round-to-nearest, dequantisation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,R", [(6, 31), (8, 127)])
def test_sdclip_scale_rule(bits, R):
    W = _weight(64, 300)
    scales = ref.sdclip_scales(W, bits=bits, clip_sigmas=12.85)
    expected = (12.85 * W.double().std(dim=1, unbiased=True) / R).to(torch.float16)
    assert scales.dtype == torch.float16 and torch.equal(scales, expected)
    if bits == 6:                                           # row std 0.037: well below PR #1579's 1/R floor
        assert (scales.float() < 1 / R).all()


def test_sdclip_floor_keeps_scales_positive():
    W = _weight(4, 50)
    W[1] = 0.0                                             # std 0: the 1e-10 floor, then fp16's smallest
    W[2] = 1e-12 * torch.randn(50)                          # tiny std: k·std/R far below fp16's range
    scales = ref.sdclip_scales(W)
    assert ref.SDCLIP_SCALE_FLOOR == 1e-10
    assert scales[1].item() == scales[2].item() == ref.FP16_SMALLEST == 2.0 ** -24
    assert scales[0].item() > ref.FP16_SMALLEST
    codes = ref.quantize_rtn(W, scales)
    assert (codes[1] == 0).all() and (ref.dequantize(codes, scales)[1] == 0).all()


def test_quantize_rtn_and_dequantize():
    W = _weight(8, 64)
    scales = ref.sdclip_scales(W)
    codes = ref.quantize_rtn(W, scales)
    expected = torch.clamp(torch.round(W.double() / scales.double()[:, None]), -31, 31)
    assert torch.equal(codes, expected.to(torch.int8))
    # round to nearest: the error is at most half a step per element
    assert ((W - ref.dequantize(codes, scales)).abs() <= scales.float()[:, None] / 2 + 1e-7).all()
    ties = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5]])
    assert ref.quantize_rtn(ties, torch.ones(1)).tolist() == [[0, 2, 2, 0, -2]]   # half to even


# ----------------------------------------------------------------------------------------------
# Cholesky retry
# ----------------------------------------------------------------------------------------------

def _with_eigenvalues(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return (q * torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_cholesky_retry_on_indefinite_hessian():
    K = 64
    eigs = [1.0] * (K - 1) + [-0.05]                        # still indefinite after 1% damping
    H = _with_eigenvalues(eigs).float()
    damped = H + 0.01 * H.diagonal().mean() * torch.eye(K)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(damped)
    U = ref.inverse_cholesky_upper(damped)                   # one retry adds 0.1·mean(diag)
    shifted = damped + 0.1 * damped.diagonal().mean() * torch.eye(K)
    assert torch.allclose(U.T @ U, torch.linalg.inv(shifted), atol=1e-4)
    W = _weight(16, K)
    codes, scales = ref.gptq_quantize(W, H, block_size=32)
    assert codes.abs().max() <= 31 and torch.isfinite(ref.dequantize(codes, scales)).all()


def test_cholesky_gives_up_with_a_clear_error():
    H = _with_eigenvalues([1.0] * 15 + [-50.0])
    H = H - torch.diag(H.diagonal()) + torch.eye(16)         # unit diagonal, strongly indefinite
    with pytest.raises(ValueError, match="hessian: Cholesky"):
        ref.gptq_quantize(_weight(4, 16).double(), H, block_size=8)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight,hessian,kwargs,exc,match", [
    (torch.randn(8, 16), torch.eye(15), {}, ValueError, r"hessian: expected shape \(16, 16\)"),
    (torch.randn(16), torch.eye(16), {}, ValueError, "weight: expected a 2-D"),
    (torch.randn(8, 16), torch.eye(16)[None], {}, ValueError, "hessian: expected a 2-D"),
    (torch.randint(0, 5, (8, 16)), torch.eye(16), {}, TypeError, "weight: expected dtype"),
    (torch.randn(8, 16), torch.eye(16).int(), {}, TypeError, "hessian: expected dtype"),
    ([[1.0, 2.0]], torch.eye(2), {}, TypeError, "weight: expected a torch.Tensor"),
    (torch.randn(8, 1), torch.eye(1), {}, ValueError, "2 columns"),
    (torch.full((8, 16), math.nan), torch.eye(16), {}, ValueError, "weight: contains NaN"),
    (torch.randn(8, 16), torch.eye(16) * math.inf, {}, ValueError, "hessian: contains NaN or Inf"),
    (torch.randn(8, 16), -torch.eye(16), {}, ValueError, "hessian: diagonal"),
    (torch.randn(8, 16), torch.eye(16), {"bits": 1}, ValueError, "bits"),
    (torch.randn(8, 16), torch.eye(16), {"bits": 9}, ValueError, "bits"),
    (torch.randn(8, 16), torch.eye(16), {"bits": 6.0}, ValueError, "bits"),
    (torch.randn(8, 16), torch.eye(16), {"block_size": 0}, ValueError, "block_size"),
    (torch.randn(8, 16), torch.eye(16), {"clip_sigmas": 0.0}, ValueError, "clip_sigmas"),
    (torch.randn(8, 16), torch.eye(16), {"damp": -0.1}, ValueError, "damp"),
])
def test_bad_input(weight, hessian, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ref.gptq_quantize(weight, hessian, **kwargs)


def test_bad_scales():
    with pytest.raises(ValueError, match=r"scales: expected shape \(8,\)"):
        ref.quantize_rtn(torch.randn(8, 16), torch.ones(7))
    with pytest.raises(TypeError, match="codes: expected dtype"):
        ref.dequantize(torch.zeros(8, 16), torch.ones(8))
