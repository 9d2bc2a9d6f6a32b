"""The Triton GPTQ (kernels.gptq_quantize / gptq_quantize_batched, docs/math.md §7.4) against the reference
evaluated in float64: proxy loss within 0.5 % and at most 0.1 % of codes different (rounding ties may
flip a code; docs/math.md §3 measures quality by the proxy loss). Codes are NaN-poisoned (int8 min, off the grid)
before the kernel runs, so a code it fails to write shows up as a mismatch."""
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import correlated_hessian

import kernels
from kernels import reference as ref
from kernels.gptq import _round_half_even


def _weight(N, K, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * 0.037).to(device)


def _with_dead_columns(H, dead):
    H = H.clone()
    H[dead, :] = 0
    H[:, dead] = 0
    return H


def _assert_matches_reference(W, H, codes, scales, **kwargs):
    ref_codes, ref_scales = ref.gptq_quantize(W.double(), H.double(), **kwargs)
    R = 2 ** (kwargs.get("bits", 6) - 1) - 1
    assert codes.dtype == torch.int8 and codes.shape == W.shape and int(codes.abs().max()) <= R
    assert torch.equal(scales.cpu(), ref_scales.cpu())
    mismatch = (codes.cpu() != ref_codes.cpu()).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.4%} of codes differ from the reference"
    loss = float(ref.quantization_proxy_loss(W, H, codes, scales))
    ref_loss = float(ref.quantization_proxy_loss(W, H, ref_codes, ref_scales))
    assert loss == pytest.approx(ref_loss, rel=5e-3)


@pytest.mark.parametrize("N,K,block_size,act_order,bits,dead", [
    (64, 200, 32, True, 6, []),            # K = 6 blocks of 32 + 8
    (48, 96, 32, False, 6, []),
    (80, 112, 32, True, 8, [0, 9, 111]),   # 80 rows: a partly masked second row tile
    (40, 130, 64, False, 8, [64, 65]),
])
def test_matches_reference(N, K, block_size, act_order, bits, dead):
    W = _weight(N, K, seed=K)
    H = _with_dead_columns(correlated_hessian(K, seed=K), dead)
    kwargs = dict(bits=bits, block_size=block_size, act_order=act_order)
    codes, scales = kernels.gptq_quantize(W, H, **kwargs)
    _assert_matches_reference(W, H, codes, scales, **kwargs)
    if dead:
        assert (codes[:, dead] == 0).all()


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _round_half_even(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


def test_round_half_even_matches_torch_round():
    below_half = torch.tensor(0.5).nextafter(torch.tensor(0.0)).item()     # 0.49999997: floor(x + 0.5) gives 1
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 30.5, -30.5, below_half, -below_half, 3.0, -0.7, 0.0, 7.2])
    y = torch.full_like(x, math.nan)
    _round_kernel[(1,)](x, y, x.numel(), BLOCK=16)
    assert torch.equal(y, torch.round(x))


def test_deterministic():
    W, H = _weight(48, 100), correlated_hessian(100, seed=7)
    first = kernels.gptq_quantize(W, H, block_size=32)
    second = kernels.gptq_quantize(W, H, block_size=32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_batched_equals_per_matrix():
    K = 56
    W = torch.stack([_weight(40, K, seed=i) for i in range(3)])
    H = torch.stack([correlated_hessian(K, seed=10), _with_dead_columns(correlated_hessian(K, seed=11), [5]),
                     2.0 * torch.eye(K)])
    codes, scales = kernels.gptq_quantize_batched(W, H, block_size=32)
    assert codes.shape == W.shape and scales.shape == W.shape[:2]
    for i in range(3):
        c, s = kernels.gptq_quantize(W[i], H[i], block_size=32)
        assert torch.equal(codes[i], c) and torch.equal(scales[i], s)


def test_block_larger_than_matrix_and_isotropic_hessian():
    W = _weight(16, 40)
    codes, scales = kernels.gptq_quantize(W, torch.eye(40), block_size=128, act_order=False)
    assert torch.equal(codes, ref.quantize_rtn(W, scales))


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    # Like every Triton op: no silent switch to another implementation; the message names the CPU one.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    W, H = _weight(24, 64), correlated_hessian(64, seed=4)
    with pytest.raises(ValueError, match=r"gptq_quantize: weight is on cpu.*kernels\.reference\.gptq_quantize"):
        kernels.gptq_quantize(W, H, block_size=32)
    with pytest.raises(ValueError, match="gptq_quantize_batched: weights is on cpu"):
        kernels.gptq_quantize_batched(W[None], H[None], block_size=32)


def test_compiles_without_graph_breaks():
    W, H = _weight(16, 48), correlated_hessian(48, seed=6)
    compiled = torch.compile(lambda w, h: kernels.gptq_quantize(w, h, block_size=16), fullgraph=True,
                             backend="aot_eager")
    codes, scales = compiled(W, H)
    eager = kernels.gptq_quantize(W, H, block_size=16)
    assert torch.equal(codes, eager[0]) and torch.equal(scales, eager[1])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: kernels.gptq_quantize(torch.randn(8, 16), torch.eye(15)), ValueError, "hessian: expected shape"),
    (lambda: kernels.gptq_quantize(torch.randn(8, 16)[None], torch.eye(16)), ValueError, "weight: expected a 2-D"),
    (lambda: kernels.gptq_quantize(torch.randn(8, 16), torch.eye(16), bits=9), ValueError, "bits"),
    (lambda: kernels.gptq_quantize(torch.randn(8, 16), torch.eye(16), block_size=-1), ValueError, "block_size"),
    (lambda: kernels.gptq_quantize(torch.full((8, 16), math.inf), torch.eye(16)), ValueError, "weight: contains"),
    (lambda: kernels.gptq_quantize(torch.randn(8, 16).int(), torch.eye(16)), TypeError, "weight: expected dtype"),
    (lambda: kernels.gptq_quantize_batched(torch.randn(2, 8, 16), torch.eye(16)[None]), ValueError,
     r"hessian: expected shape \(2, 16, 16\)"),
    (lambda: kernels.gptq_quantize_batched(torch.randn(8, 16), torch.eye(16)), ValueError, "weight: expected a 3-D"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# GPU: the model's shapes (pr1579: d = 736, MLP hidden 2944, KV dim 368)
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(736, 736), (368, 736), (2944, 736), (736, 2944)])
@pytest.mark.parametrize("act_order", [True, False])
def test_gpu_model_shapes(N, K, act_order):
    W = _weight(N, K, seed=N + K, device="cuda").bfloat16()
    H = _with_dead_columns(correlated_hessian(K, n=2 * K, seed=K, device="cuda"), [3, K - 1])
    codes, scales = kernels.gptq_quantize(W, H, act_order=act_order)
    _assert_matches_reference(W, H, codes, scales, act_order=act_order)
    again = kernels.gptq_quantize(W, H, act_order=act_order)
    assert torch.equal(codes, again[0]) and torch.equal(scales, again[1])


@pytest.mark.gpu
def test_gpu_batched_model_shape():
    W = torch.stack([_weight(368, 736, seed=i, device="cuda") for i in range(4)])
    H = torch.stack([correlated_hessian(736, n=1472, seed=i, device="cuda") for i in range(4)])
    codes, scales = kernels.gptq_quantize_batched(W, H)
    for i in range(4):
        c, s = kernels.gptq_quantize(W[i], H[i])
        # cuBLAS may pick another kernel for a batch of 1 than for 4: allow rounding-level code flips.
        assert torch.equal(s, scales[i]) and (c != codes[i]).float().mean() <= 1e-3
        _assert_matches_reference(W[i], H[i], codes[i], scales[i])
