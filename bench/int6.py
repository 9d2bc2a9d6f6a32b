"""Benchmark: int6_linear on packed weights vs cuBLAS bf16 F.linear on the dequantised weight.

Layer shapes of the pr1579 preset (attention q/out, k/v, MLP fc/proj, and the tied embedding as an int6
LM head) for M (rows of x) in 1, 4, 16, 128, 2048, 8192; bf16 activations, fp16 per-row scales.
Both ops run in this process on the same random inputs, timed with triton.testing.do_bench (median,
L2 flushed before every run, so weights come from HBM). Reports µs, effective weight bandwidth
(bytes of the weight each op reads / time: 0.75 B + the scale per row for int6, 2 B for bf16), TFLOP/s,
and the speed-up over bf16 (ideal at M = 1: 2 / 0.75 = 2.67x). Prints a table and writes
bench/plots/int6.csv and bench/plots/int6.png. Without CUDA it prints a message and exits 0.

    python bench/int6.py [--m 1 4 16] [--reps-ms 100]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crawler.config import CrawlerConfig  # noqa: E402
from kernels import int6_linear, pack_int6  # noqa: E402

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")
M_VALUES = (1, 4, 16, 128, 2048, 8192)


def layer_shapes() -> list[tuple[str, int, int]]:
    """(name, K = in features, N = out features) of the pr1579 preset's int6 matrices."""
    c = CrawlerConfig.preset("pr1579")
    d = c.model_dim
    return [("attn.c_q / attn.proj", d, d), ("attn.c_k / attn.c_v", d, c.kv_dim),
            ("mlp.fc", d, c.mlp_hidden), ("mlp.proj", c.mlp_hidden, d),
            ("lm_head (tok_emb)", d, c.vocab_size)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="rows of x to time")
    ap.add_argument("--reps-ms", type=int, default=100, help="do_bench measuring time per point (ms)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/int6.py: no CUDA device; nothing measured.")
        return 0
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"device: {name} | torch {torch.__version__} | triton {triton.__version__}")
    print("do_bench median, L2 flushed per run; weight GB/s = weight bytes read / time")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    header = f"{'layer':22s} {'K':>5s} {'N':>5s} {'M':>5s} | {'int6 µs':>9s} {'bf16 µs':>9s} | " \
             f"{'int6 GB/s':>9s} {'bf16 GB/s':>9s} | {'int6 TF/s':>9s} {'bf16 TF/s':>9s} | {'speed-up':>8s}"
    print(header)
    print("-" * len(header))
    for layer, K, N in layer_shapes():
        codes = torch.randint(-31, 32, (N, K), dtype=torch.int8, device=dev, generator=gen)
        scales = (torch.rand(N, device=dev, generator=gen) * 0.01 + 1e-3).half()
        packed = pack_int6(codes)
        w_bf16 = (codes.float() * scales.float()[:, None]).bfloat16()   # the baseline's dequantised weight
        del codes
        int6_bytes = packed.numel() + scales.numel() * scales.element_size()
        bf16_bytes = w_bf16.numel() * 2
        for M in args.m:
            x = torch.randn(M, K, device=dev, generator=gen).bfloat16()
            ours = int6_linear(x, packed, scales)            # first call also picks the config
            base = F.linear(x, w_bf16)
            err = float((ours.float() - base.float()).norm() / base.float().norm())
            if err > 1e-2:
                print(f"{layer} M={M}: int6_linear disagrees with the bf16 baseline (rel err {err:.2e})")
                return 1
            t6 = do_bench(lambda: int6_linear(x, packed, scales), rep=args.reps_ms, return_mode="median")
            tb = do_bench(lambda: F.linear(x, w_bf16), rep=args.reps_ms, return_mode="median")
            flop = 2.0 * M * N * K
            row = dict(device=name, layer=layer, K=K, N=N, M=M, int6_us=t6 * 1e3, bf16_us=tb * 1e3,
                       int6_weight_GBps=int6_bytes / t6 / 1e6, bf16_weight_GBps=bf16_bytes / tb / 1e6,
                       int6_TFLOPs=flop / t6 / 1e9, bf16_TFLOPs=flop / tb / 1e9, speedup=tb / t6, rel_err=err)
            rows.append(row)
            print(f"{layer:22s} {K:5d} {N:5d} {M:5d} | {row['int6_us']:9.2f} {row['bf16_us']:9.2f} | "
                  f"{row['int6_weight_GBps']:9.0f} {row['bf16_weight_GBps']:9.0f} | "
                  f"{row['int6_TFLOPs']:9.1f} {row['bf16_TFLOPs']:9.1f} | {row['speedup']:7.2f}x", flush=True)

    os.makedirs(PLOTS, exist_ok=True)
    csv_path = os.path.join(PLOTS, "int6.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png_path = os.path.join(PLOTS, "int6.png")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for layer, K, N in layer_shapes():
        pts = [(r["M"], r["speedup"]) for r in rows if r["layer"] == layer]
        ax.plot(*zip(*pts), marker="o", label=f"{layer} ({K}->{N})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(2 / 0.75, color="gray", lw=0.8, ls="--", label="ideal weight-bound 2.67x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of x)")
    ax.set_ylabel("speed-up over cuBLAS bf16 F.linear")
    ax.set_title(f"int6_linear vs bf16, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
