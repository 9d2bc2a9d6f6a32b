"""MLP: kernels.relu2_mlp (fc + relu² / LeakyReLU(0.5)² fused into the up-projection) vs eager torch ops
and their torch.compile.

The pr1579 micro-batch: 65,536 tokens, 736 -> 2944 -> 736, bf16 activations with fp32 master weights
(the model under autocast casts them, as CastedLinear does), relu² and LeakyReLU(0.5)²; forward and
forward+backward on the same random inputs, with the peak memory one call adds.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from bench.harness import FUSED_VS_TORCH, PASSES, first_call, fused_vs_torch, pass_fn, rel_err

ACTIVATIONS = {"relu2": 0.0, "leaky0.5^2": 0.5}     # name -> negative slope
TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def mlp_inputs(bench):
    s = bench.shapes
    g = bench.generator(0)
    h = bench.randn(s.tokens, s.model_dim, generator=g, requires_grad=True)
    fc, proj = (bench.randn(n_out, n_in, generator=g, std=n_in ** -0.5, dtype=torch.float32, requires_grad=True)
                for n_out, n_in in ((s.mlp_hidden, s.model_dim), (s.model_dim, s.mlp_hidden)))
    return h, fc, proj, bench.randn(s.tokens, s.model_dim, generator=g)


@pytest.mark.parametrize("act, pass_, key",
                         [(a, p, key) for a in ACTIVATIONS for p in PASSES for key in FUSED_VS_TORCH])
def test_mlp(benchmark, bench, mlp_inputs, act, pass_, key):
    h, fc, proj, grad = mlp_inputs
    slope = ACTIVATIONS[act]
    op, label, role = fused_vs_torch(key, kernels.relu2_mlp, kernels.reference.relu2_mlp)
    with torch.no_grad():
        out = first_call(lambda: op(h, fc, proj, slope), impl=label, role=role)
        err = rel_err(out, kernels.reference.relu2_mlp(h, fc, proj, slope))
    s = bench.shapes
    flops = 2 * 2 * s.tokens * s.model_dim * s.mlp_hidden * (1 if pass_ == "fwd" else 3)
    bench.run(benchmark, pass_fn(lambda: op(h, fc, proj, slope), pass_, grad), impl=label, role=role,
              group=f"{act} {pass_} M={s.tokens} {s.model_dim}->{s.mlp_hidden}", grad_to_none=(h, fc, proj),
              flops=flops, metrics={"rel_err_vs_eager": err})
    assert err < TOLERANCE, f"{label}: output differs from the eager MLP by {err:.2e}"
