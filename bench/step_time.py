"""Training-step benchmark at the seed's per-GPU shape: the seed's ops vs our fused ops.

One micro-batch of the `pr1579` preset (32 × 2048 tokens), bf16 autocast, QAT on, torch.compile on for
both variants:
  (a) baseline — the seed's way: SDPA attention with the flash backend pinned + XSA in torch, the eager
      embedding chain, the MLP and the softcapped CE as PyTorch ops (all compiled by torch.compile);
  (b) fused — our Triton ops (`CrawlerGPT(ops="triton")`).
Forward+backward is timed with CUDA events (median over --steps after --warmup steps), and the
optimiser step separately: the whole single-GPU step, and one rank's share on 8 GPUs (1/8 of the Muon
matrices + the AdamW groups; the all-reduce is not included). Prints ms, tokens/s, model FLOPs
utilisation (FLOPs stated below), peak memory, a per-op breakdown of (b) from torch.profiler, and
writes CSV + PNG under bench/plots/. Exits 0 with a message on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from crawler import CrawlerConfig, CrawlerGPT  # noqa: E402
from crawler.optim import build_optimizers  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0      # spec sheet, SXM; SPEC §8
PLOTS = Path(__file__).resolve().parent / "plots"


def sdpa_xsa_attention(q, k, v, *, causal=True, xsa=False, softmax_scale=None):
    """The seed's attention: SDPA (flash backend pinned, native GQA) then XSA as torch ops.
    Flash needs a head dim that is a multiple of 8: D = 46 is zero-padded to 48 (the scale stays
    1/sqrt(46)), as a user of SDPA at this shape would have to."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    pad = (-D) % 8
    qt, kt, vt = (F.pad(t, (0, pad)).transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=True)
    y = y.transpose(1, 2)[..., :D]
    return kernels.reference.exclusive_self_attention(y, v) if xsa else y


SEED_OPS = SimpleNamespace(
    attention=sdpa_xsa_attention,
    embed=kernels.reference.embed,
    relu2_mlp=kernels.reference.relu2_mlp,
    softcapped_cross_entropy=kernels.reference.softcapped_cross_entropy,
)


def model_flops_per_token(config: CrawlerConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (matmul weights applied per token) + attention.

    Matmul weights per token: every schedule position applies its block's c_q, c_k, c_v, proj, fc,
    mlp.proj; plus the tied head (V × d), bigram.proj and ve.proj. Attention (causal) per position:
    forward 2·T·H·D (QKᵀ and PV over T/2 keys on average, 2 FLOPs per MAC), backward 2.5× that.
    """
    d, kv, hid, P = config.model_dim, config.kv_dim, config.mlp_hidden, config.num_positions
    block = 2 * d * d + 2 * d * kv + 2 * d * hid
    weights = P * block + config.vocab_size * d + d * config.bigram_dim + (kv * config.ve_dim if config.ve_enabled else 0)
    attn_fwd = 2 * seq_len * config.num_heads * config.head_dim * P
    return 6 * weights + 3.5 * attn_fwd


def cuda_time_ms(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def run_variant(name, ops, config, args):
    torch.manual_seed(0)
    model = CrawlerGPT(config, ops=ops).cuda()
    model.set_qat(True)
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device="cuda", generator=g)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device="cuda", generator=g)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(ids, targets)
        loss.backward()

    t0 = time.perf_counter()
    fwd_bwd()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = cuda_time_ms(fwd_bwd, args.steps, args.warmup)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30

    optimizers = build_optimizers(model)
    opt_ms = statistics.median(cuda_time_ms(lambda: [o.step() for o in optimizers], args.steps, 3))
    # One rank's share on 8 GPUs: every 8th Muon matrix (rank 0's), plus both AdamW groups.
    muon = optimizers[0]
    full_params = [p for group in muon.param_groups for p in group["params"]]
    for group in muon.param_groups:
        group["params"] = [p for p in group["params"] if any(p is q for q in full_params[::8])]
    shard_ms = statistics.median(cuda_time_ms(lambda: [o.step() for o in optimizers], args.steps, 3))

    breakdown = None
    if args.profile and name == "fused":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd()
            torch.cuda.synchronize()
        breakdown = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    tokens = args.batch * args.seq_len
    med = statistics.median(times)
    flops = model_flops_per_token(config, args.seq_len) * tokens
    return dict(variant=name, fwd_bwd_ms=med, fwd_bwd_min_ms=min(times), tokens_per_s=tokens / (med / 1e3),
                mfu=flops / (med / 1e3) / (H100_BF16_DENSE_TFLOPS * 1e12), peak_gib=peak_gib,
                optimizer_ms=opt_ms, optimizer_rank_share_ms=shard_ms, compile_s=compile_s), breakdown


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pr1579", help="model preset (default: pr1579)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per micro-batch (default: 32)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default: 2048)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, median reported (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after compile (default: 5)")
    parser.add_argument("--variants", default="baseline,fused", help="comma list of baseline,fused")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-op breakdown")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/step_time.py: no CUDA device here; nothing measured.")
        return 0
    config = CrawlerConfig.preset(args.preset)
    variants = {"baseline": SEED_OPS, "fused": "triton"}
    device = torch.cuda.get_device_name()
    rows = []
    for name in args.variants.split(","):
        row, breakdown = run_variant(name, variants[name], config, args)
        rows.append(row)
        if breakdown:
            print(f"\nper-op breakdown of '{name}' (3 steps, CUDA time):\n{breakdown}")
    flops_tok = model_flops_per_token(config, args.seq_len)
    print(f"\ndevice: {device}   commit: {git_commit()}   date: {time.strftime('%Y-%m-%d')}")
    print(f"shape: {args.preset}, {args.batch} x {args.seq_len} tokens, bf16 autocast, QAT on, torch.compile")
    print(f"FLOPs/token (training): {flops_tok / 1e6:.1f} M; MFU vs {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s bf16 dense")
    print(f"{'variant':<10} {'fwd+bwd ms':>11} {'tok/s':>11} {'MFU':>6} {'peak GiB':>9} {'opt ms':>8} "
          f"{'opt/8 ms':>9} {'compile s':>10}")
    for r in rows:
        print(f"{r['variant']:<10} {r['fwd_bwd_ms']:>11.2f} {r['tokens_per_s']:>11.0f} {r['mfu']:>6.1%} "
              f"{r['peak_gib']:>9.2f} {r['optimizer_ms']:>8.2f} {r['optimizer_rank_share_ms']:>9.2f} "
              f"{r['compile_s']:>10.1f}")
    if len(rows) == 2:
        print(f"speed-up fused vs baseline (fwd+bwd, same run, {device}): "
              f"{rows[0]['fwd_bwd_ms'] / rows[1]['fwd_bwd_ms']:.2f}x")
    PLOTS.mkdir(parents=True, exist_ok=True)
    with open(PLOTS / "step_time.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "commit", *rows[0].keys()])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": device, "commit": git_commit(), **r})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([r["variant"] for r in rows], [r["fwd_bwd_ms"] for r in rows])
    ax.set_ylabel("fwd+bwd ms per micro-batch")
    ax.set_title(f"{args.preset} {args.batch}x{args.seq_len}, {device}", fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / "step_time.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
