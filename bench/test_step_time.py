"""Training step: one pr1579 micro-batch forward+backward with the seed's ops vs our fused ops, both
compiled; MFU, peak memory, optimiser, per-op profile.

One micro-batch of the pr1579 preset (32 × 2048 tokens: one GPU's share of the 8-GPU run), bf16
autocast, QAT on, torch.compile(fullgraph=True) for both variants:
  seed ops   the seed's way (bench.baselines.SEED_OPS): SDPA flash + XSA as torch ops, the eager
             embedding chain, MLP and softcapped cross-entropy, all compiled by torch.compile
  ours       CrawlerGPT(ops="triton"): our fused Triton ops
Records the forward+backward median (gradients set to None between steps, as zero_grad does), the
compile time of the first step, tokens/s, model FLOPs utilisation against the device's dense bf16
peak (docs/math.md §8), the peak memory of a step, the optimiser step (all of it on one GPU, and one
rank's share on 8 GPUs: every 8th Muon matrix + both AdamW groups, the all-reduce left out) and the
top operators of a torch.profiler trace of three steps.
"""
from __future__ import annotations

import time

import pytest
import torch

from bench import harness
from bench.baselines import SEED_OPS
from bench.harness import first_call
from crawler import CrawlerConfig, CrawlerGPT

# ours first: its path is the one a first GPU run is likeliest to find broken
VARIANTS = {"ours": ("ours (fused Triton ops), compiled", "ours", "triton"),
            "seed": ("seed ops (SDPA flash + torch ops), compiled", "baseline", SEED_OPS)}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}   # dense bf16 spec (docs/math.md §8); the H200 has the H100's
PROFILE_TOP = 15
WORLD_SIZE = 8      # the record runs on 8 GPUs: the optimiser's per-rank share


def model_flops_per_token(config: CrawlerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (matmul weights applied per token) + attention.

    Every schedule position applies its block's c_q, c_k, c_v, proj, fc and mlp.proj; plus the tied head
    (V × d), bigram.proj and ve.proj. Causal attention per position: forward 2·T·H·D (QKᵀ and PV over T/2
    keys on average, 2 FLOPs per MAC), backward 2.5× that."""
    d, kv, hid, P = config.model_dim, config.kv_dim, config.mlp_hidden, config.num_positions
    block = 2 * d * d + 2 * d * kv + 2 * d * hid
    weights = (P * block + config.vocab_size * d + d * config.bigram_dim
               + (kv * config.ve_dim if config.ve_enabled else 0))
    attn_fwd = 2 * seq_len * config.num_heads * config.head_dim * P
    return 6 * weights + 3.5 * attn_fwd


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def profile_top(fn, device: torch.device, steps: int = 3) -> list[list]:
    """[operator, device ms per step, calls per step] of the PROFILE_TOP most expensive operators."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()

    def cost_us(e):
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = sorted(prof.key_averages(), key=cost_us, reverse=True)[:PROFILE_TOP]
    return [[e.key[:80], round(cost_us(e) / 1e3 / steps, 4), e.count // steps] for e in events]


@pytest.mark.cost_s(90)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step(benchmark, bench, variant):
    from crawler.optim import Muon, build_optimizers
    label, role, ops = VARIANTS[variant]
    s = bench.shapes
    config = CrawlerConfig.preset(s.preset)
    torch.manual_seed(0)
    model = CrawlerGPT(config, ops=ops).to(bench.device)
    model.set_qat(True)
    compiled = harness.compiled(model, fullgraph=True)
    g = bench.generator(1)
    ids, targets = (torch.randint(0, config.vocab_size, (s.batch, s.seq_len), device=bench.device, generator=g)
                    for _ in range(2))
    params = list(model.parameters())

    def fwd_bwd():
        with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.device.type == "cuda"):
            loss = compiled(ids, targets)
        loss.backward()

    start = time.perf_counter()
    first_call(fwd_bwd, impl=label, role=role)
    bench.synchronize()
    compile_s = time.perf_counter() - start

    timing = bench.time(fwd_bwd, grad_to_none=params, min_runs=10)
    tokens = s.tokens
    tflops = model_flops_per_token(config, s.seq_len) * tokens / timing.median_ms * 1e-9
    peak = peak_tflops(bench.device_name)
    metrics = {"tokens/s": tokens / timing.median_ms * 1e3, "TFLOP/s": tflops,
               "MFU": None if peak is None else tflops / peak, "compile_s": compile_s,
               "peak_MiB": bench.peak_mib(fwd_bwd, grad_to_none=params)}

    fwd_bwd()                                    # gradients for the optimiser steps
    optimizers = build_optimizers(model)
    metrics["optimizer_ms"] = bench.time(lambda: [o.step() for o in optimizers], min_runs=5).median_ms
    muon = next(o for o in optimizers if isinstance(o, Muon))
    matrices = [p for group in muon.param_groups for p in group["params"]]
    rank_share = {id(p) for p in matrices[::WORLD_SIZE]}
    for group in muon.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in rank_share]
    metrics["optimizer_rank_share_ms"] = bench.time(lambda: [o.step() for o in optimizers], min_runs=5).median_ms
    metrics["profile_top"] = profile_top(fwd_bwd, bench.device)

    group = f"{s.preset} micro-batch {s.batch}x{s.seq_len} fwd+bwd"
    bench.pedantic(benchmark, fwd_bwd, group=group, grad_to_none=params, median_ms=timing.median_ms)
    bench.record(benchmark, group=group, impl=label, role=role, timing=timing, metrics=metrics)
