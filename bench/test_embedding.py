"""Embedding: kernels.embed (token + BigramHash + rms_norm + SmearGate fused) vs the eager module chain
and its torch.compile.

The pr1579 micro-batch (B 32, T 2048, V 8192, d 736, bigram 10240 × 128): bf16 tables, fp32 projection
and gate (the model's dtypes), Zipf-like token ids; forward and forward+backward on the same inputs:
  ours              kernels.embed
  eager             kernels.reference.embed, the module chain (what CrawlerGPT runs with ops="reference")
  torch.compile     kernels.reference.embed under torch.compile(fullgraph=True)
Bytes the op must move (the floor GB/s is measured against; gathered rows count once per token,
N = B·T, bf16 = 2 bytes):
  forward:   ids (8N) + token rows (2dN) + bigram rows (2kN) + output (2dN) + proj (4dk) + gate (4d)
  backward:  the forward's reads again (the normalised rows are rebuilt or stored: one N×d read either
             way) + dy (2dN) + dtok_emb (2Vd) + dbigram_table (2·NB·k) + dproj (4dk) + dgate (4d)
At this shape: forward ≈ 210 MB, forward+backward ≈ 440 MB.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from bench.harness import FUSED_VS_TORCH, PASSES, first_call, fused_vs_torch, pass_fn, rel_err

TOLERANCE = 2e-2


def bytes_moved(s) -> dict[str, float]:
    """The minimum traffic of each pass (see the module docstring)."""
    n, d, k = s.tokens, s.model_dim, s.bigram_dim
    fwd = 8 * n + 2 * d * n + 2 * k * n + 2 * d * n + 4 * d * k + 4 * d
    bwd = (fwd - 2 * d * n) + 2 * d * n + 2 * s.vocab_size * d + 2 * s.bigram_buckets * k + 4 * d * k + 4 * d
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}


@pytest.fixture(scope="module")
def embed_inputs(bench):
    """ids (B, T) and the four parameters (requires_grad), and a random output gradient."""
    s = bench.shapes
    g = bench.generator(0)
    zipf = 1.0 / torch.arange(1, s.vocab_size + 1, dtype=torch.float32, device=bench.device)
    ids = torch.multinomial(zipf, s.tokens, replacement=True, generator=g).reshape(s.batch, s.seq_len)
    params = [   # the model's dtypes: tables in the benchmark dtype, projection and gate in fp32
        bench.randn(s.vocab_size, s.model_dim, generator=g, std=0.005, requires_grad=True),
        bench.randn(s.bigram_buckets, s.bigram_dim, generator=g, std=0.01, requires_grad=True),
        bench.randn(s.model_dim, s.bigram_dim, generator=g, std=s.bigram_dim ** -0.5, dtype=torch.float32,
                    requires_grad=True),
        bench.randn(s.model_dim, generator=g, dtype=torch.float32, requires_grad=True),
    ]
    return ids, params, bench.randn(s.batch, s.seq_len, s.model_dim, generator=g)


@pytest.mark.parametrize("pass_, key", [(p, key) for p in PASSES for key in FUSED_VS_TORCH])
def test_embed(benchmark, bench, embed_inputs, pass_, key):
    ids, params, grad = embed_inputs
    op, label, role = fused_vs_torch(key, kernels.embed, kernels.reference.embed)
    with torch.no_grad():
        out = first_call(lambda: op(ids, *params), impl=label, role=role)
        err = rel_err(out, kernels.reference.embed(ids, *params))
    bench.run(benchmark, pass_fn(lambda: op(ids, *params), pass_, grad), group=f"{pass_} N={bench.shapes.tokens}",
              impl=label, role=role, grad_to_none=params, bytes_moved=bytes_moved(bench.shapes)[pass_],
              metrics={"rel_err_vs_eager": err})
    assert err < TOLERANCE, f"{label}: output differs from the eager chain by {err:.2e}"
