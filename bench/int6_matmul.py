"""Benchmark: int6_linear on packed weights vs cuBLAS bf16 F.linear on the dequantised weight.

Layer shapes of the pr1579 preset (attention q/out, k/v, MLP fc/proj, and the tied embedding as an int6
LM head) and the squares 4096² and 8192², for M (rows of x) in 1, 4, 16, 64, 2048; bf16 activations,
fp16 per-row scales. Then end-to-end decoding: tokens/s of the int6 model (crawler.inference, packed
weights) vs the bf16 model (the same weights dequantised), greedy, batch 1, KV cache, no CUDA graphs.
Both ops run in this process on the same random inputs, timed with triton.testing.do_bench (median,
L2 flushed before every run, so weights come from HBM). Reports µs, effective weight bandwidth
(bytes of the weight each op reads / time: 0.75 B + the scale per row for int6, 2 B for bf16), TFLOP/s,
and the speed-up over bf16 (ideal at M = 1: 2 / 0.75 = 2.67x). Prints a table and writes
bench/plots/int6_matmul.csv and bench/plots/int6_matmul.png. Without CUDA it prints a message and exits 0.

    python bench/int6_matmul.py [--m 1 4 16] [--reps-ms 100] [--decode-tokens 128]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crawler.artifact import model_from_artifact  # noqa: E402
from crawler.config import CrawlerConfig  # noqa: E402
from crawler.inference import generate, load_int6_model  # noqa: E402
from crawler.model import CrawlerGPT  # noqa: E402
from crawler.quant import quantize_state_dict  # noqa: E402
from kernels import int6_linear, pack_int6  # noqa: E402

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")
M_VALUES = (1, 4, 16, 64, 2048)


def layer_shapes() -> list[tuple[str, int, int]]:
    """(name, K = in features, N = out features) of the pr1579 preset's int6 matrices."""
    c = CrawlerConfig.preset("pr1579")
    d = c.model_dim
    return [("attn.c_q / attn.proj", d, d), ("attn.c_k / attn.c_v", d, c.kv_dim),
            ("mlp.fc", d, c.mlp_hidden), ("mlp.proj", c.mlp_hidden, d),
            ("lm_head (tok_emb)", d, c.vocab_size), ("square 4096", 4096, 4096), ("square 8192", 8192, 8192)]


def decode_tokens_per_s(model, prompt_len: int, new_tokens: int) -> float:
    """Greedy batch-1 decoding speed (new tokens / s) of `model`, after one untimed warm-up run."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(2))
    generate(model, prompt, new_tokens, temperature=0.0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompt, new_tokens, temperature=0.0)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


def decode_comparison(new_tokens: int) -> dict:
    """tokens/s of the int6 model and of the bf16 model with the same (random, RTN-quantised) pr1579 weights."""
    torch.manual_seed(0)
    config = CrawlerConfig.preset("pr1579")
    state = CrawlerGPT(config, ops="reference").state_dict()
    for name, t in state.items():       # zero-init projections carry no signal: give every matrix values
        if t.dim() == 2 and name.endswith("proj.weight"):
            t.normal_(0, 0.02)
    artifact = quantize_state_dict(state, config, plan="rtn_seed_floor", log=None).artifact
    int6 = load_int6_model(artifact, device="cuda", ops="auto")
    bf16 = model_from_artifact(artifact, device="cuda", ops="auto").bfloat16()
    return {"int6_tok_s": decode_tokens_per_s(int6, 128, new_tokens),
            "bf16_tok_s": decode_tokens_per_s(bf16, 128, new_tokens)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="rows of x to time")
    ap.add_argument("--reps-ms", type=int, default=100, help="do_bench measuring time per point (ms)")
    ap.add_argument("--decode-tokens", type=int, default=128,
                    help="new tokens per end-to-end decode run (0 skips it)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/int6_matmul.py: no CUDA device; nothing measured.")
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

    if args.decode_tokens:
        dec = decode_comparison(args.decode_tokens)
        print(f"decode (pr1579, batch 1, greedy, {args.decode_tokens} new tokens after a 128-token prompt): "
              f"int6 {dec['int6_tok_s']:.1f} tok/s, bf16 {dec['bf16_tok_s']:.1f} tok/s, "
              f"ratio {dec['int6_tok_s'] / dec['bf16_tok_s']:.2f}x ({name})")

    os.makedirs(PLOTS, exist_ok=True)
    csv_path = os.path.join(PLOTS, "int6_matmul.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    png_path = os.path.join(PLOTS, "int6_matmul.png")
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
