"""Cross-entropy: kernels.softcapped_cross_entropy (tied head, softcap and CE fused; logits never stored)
vs eager torch ops and their torch.compile.

The pr1579 micro-batch: 65,536 tokens, d 736, V 8192, softcap 30, bf16 hidden states and a bf16 tied
embedding (the seed's tok_emb); forward and forward+backward (to the hidden states and the embedding)
on the same random inputs, with the peak memory one call adds (the eager head stores N × V logits).
"""
from __future__ import annotations

import pytest
import torch

import kernels
from bench.harness import FUSED_VS_TORCH, PASSES, first_call, fused_vs_torch, pass_fn, rel_err

TOLERANCE = 1e-2


@pytest.fixture(scope="module")
def ce_inputs(bench):
    s = bench.shapes
    g = bench.generator(0)
    hidden = bench.randn(s.tokens, s.model_dim, generator=g, requires_grad=True)
    weight = bench.randn(s.vocab_size, s.model_dim, generator=g, std=0.5, requires_grad=True)
    targets = torch.randint(0, s.vocab_size, (s.tokens,), generator=g, device=bench.device)
    return hidden, weight, targets


@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in FUSED_VS_TORCH])
def test_cross_entropy(benchmark, bench, ce_inputs, pass_, key):
    hidden, weight, targets = ce_inputs
    softcap = bench.shapes.logit_softcap
    op, label, role = fused_vs_torch(key, kernels.softcapped_cross_entropy, kernels.reference.softcapped_cross_entropy)
    with torch.no_grad():
        loss = first_call(lambda: op(hidden, weight, targets, softcap), impl=label, role=role)
        err = rel_err(loss, kernels.reference.softcapped_cross_entropy(hidden, weight, targets, softcap))
    s = bench.shapes
    flops = 2 * s.tokens * s.model_dim * s.vocab_size * (1 if pass_ == "fwd" else 3)   # logits; + dh, dW
    bench.run(benchmark, pass_fn(lambda: op(hidden, weight, targets, softcap), pass_), impl=label, role=role,
              group=f"{pass_} N={s.tokens} V={s.vocab_size}", grad_to_none=(hidden, weight), flops=flops,
              metrics={"rel_err_vs_eager": err})
    assert err < TOLERANCE, f"{label}: loss differs from the eager head by {err:.2e}"
