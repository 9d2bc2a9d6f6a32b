"""GPTQ: kernels.gptq_quantize(_batched) (int6 + SDClip, Triton column updates) vs the torch reference on
the same GPU and on the CPU, all 30 block matrices of pr1579.

5 blocks × (c_q 736×736, c_k 368×736, c_v 368×736, attention proj 736×736, mlp fc 2944×736, mlp proj
736×2944). Weights are random with row std 1/sqrt(736) (what orthogonal init gives); Hessians are XᵀX/n
of random correlated activations (n = 2K), one per layer input as in the model (c_q, c_k and c_v share
theirs). On the same inputs, the seconds for all 30 matrices:
  ours, batched      kernels.gptq_quantize_batched, one call per distinct shape (measured end to end)
  ours, single       kernels.gptq_quantize, one call per matrix (one per shape timed, × its count)
  torch reference    kernels.reference.gptq_quantize on the GPU, and on the CPU (one per shape, × count)
Goals: ours <= 1.0 s for all 30 and >= 10× the torch reference on the same GPU. The batched case also
records the proxy-loss ratio ours / reference (mean over the 30) and the largest fraction of codes
that differ from the reference's.
"""
from __future__ import annotations

import math
import statistics

import pytest
import torch

import kernels
from bench.harness import Timing
from crawler import CrawlerConfig

IMPLS = {
    "ours_batched": ("ours, batched (one call per shape)", "ours"),
    "ours_single": ("ours, one call per matrix (est.)", "baseline"),
    "torch_gpu": ("torch reference, same GPU (est.)", "baseline"),
    "torch_cpu": ("torch reference, CPU (est.)", "baseline"),
}


def block_layers(preset: str) -> list[tuple[str, tuple[int, int], str]]:
    """(name, (N, K), the input whose Hessian it uses) of one block's six matrices."""
    c = CrawlerConfig.preset(preset)
    d, kv, hid = c.model_dim, c.kv_dim, c.mlp_hidden
    return [("attn.c_q", (d, d), "attn_in"), ("attn.c_k", (kv, d), "attn_in"), ("attn.c_v", (kv, d), "attn_in"),
            ("attn.proj", (d, d), "proj_in"), ("mlp.fc", (hid, d), "fc_in"), ("mlp.proj", (d, hid), "mlp_proj_in")]


@pytest.fixture(scope="module")
def gptq_problem(bench):
    """{(N, K): (weights (n, N, K), hessians (n, K, K))} on the device, every block's matrices of a shape."""
    g = torch.Generator().manual_seed(0)
    d = CrawlerConfig.preset(bench.shapes.preset).model_dim
    groups: dict[tuple[int, int], tuple[list, list]] = {}
    for _ in range(bench.shapes.gptq_blocks):
        hessians = {}
        for _, (n_out, k), source in block_layers(bench.shapes.preset):
            if source not in hessians:
                mix = (torch.randn(k, k, generator=g) * torch.logspace(0, -1.5, k)[:, None]).to(bench.device)
                x = torch.randn(2 * k, k, generator=g).to(bench.device) @ mix
                hessians[source] = x.T @ x / (2 * k)
            w = (torch.randn(n_out, k, generator=g) / math.sqrt(d)).to(bench.device)
            ws, hs = groups.setdefault((n_out, k), ([], []))
            ws.append(w)
            hs.append(hessians[source])
    yield {shape: (torch.stack(ws), torch.stack(hs)) for shape, (ws, hs) in groups.items()}
    torch.cuda.empty_cache()


@pytest.mark.cost_s(60)
@pytest.mark.parametrize("key", list(IMPLS))
def test_gptq(benchmark, bench, gptq_problem, key):
    label, role = IMPLS[key]
    count = sum(W.shape[0] for W, _ in gptq_problem.values())
    group = f"{bench.shapes.preset}: all {count} block matrices"
    if key == "torch_cpu" and bench.device.type == "cpu":
        pytest.skip("the CPU reference is the GPU reference on this machine")
    if key == "ours_batched":
        def all_shapes():
            return [kernels.gptq_quantize_batched(W, H) for W, H in gptq_problem.values()]
        bench.run(benchmark, all_shapes, group=group, impl=label, role=role, memory=False, min_runs=3,
                  metrics=quality(gptq_problem, all_shapes()))
        return
    # One matrix per shape, timed and multiplied by the shape's count.
    device = torch.device("cpu") if key == "torch_cpu" else bench.device
    firsts = [(W[0].to(device), H[0].to(device), W.shape[0]) for W, H in gptq_problem.values()]
    quantize = kernels.gptq_quantize if key == "ours_single" else kernels.reference.gptq_quantize
    host = device.type == "cpu" or key == "torch_gpu"        # the reference is a host-driven column loop
    per_shape = [(bench.time(lambda w=w, h=h: quantize(w, h), min_runs=3, wall_clock=host,
                             warmup=key != "torch_cpu"), n) for w, h, n in firsts]
    timing = Timing(*(sum(getattr(t, f) * n for t, n in per_shape) for f in ("q20_ms", "median_ms", "q80_ms")))
    bench.pedantic(benchmark, lambda: [quantize(w, h) for w, h, _ in firsts], group=group,
                   median_ms=sum(t.median_ms for t, _ in per_shape), rounds=None if key == "ours_single" else 1)
    bench.record(benchmark, group=group, impl=label, role=role, timing=timing,
                 metrics={"estimated": "one matrix per shape timed, x its count", "matrices": count,
                          "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None})


def quality(problem, results) -> dict:
    """Proxy loss ours / reference (mean) and the largest fraction of codes that differ, over every matrix."""
    ratios, differ = [], []
    for (W, H), (codes, scales) in zip(problem.values(), results):
        for i in range(W.shape[0]):
            ref_codes, ref_scales = kernels.reference.gptq_quantize(W[i], H[i])
            ratios.append(float(kernels.reference.quantization_proxy_loss(W[i], H[i], codes[i], scales[i]) /
                                kernels.reference.quantization_proxy_loss(W[i], H[i], ref_codes, ref_scales)))
            differ.append(float((codes[i] != ref_codes).float().mean()))
    return {"proxy_loss_ours_over_ref": statistics.mean(ratios), "max_codes_differ": max(differ)}
