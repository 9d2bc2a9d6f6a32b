"""Benchmark: fused Triton embed (token + BigramHash + rms_norm + SmearGate) vs the eager module chain
(kernels.reference.embed, what CrawlerGPT runs with ops="reference") and its torch.compile.

Shape: PR #1579's micro-batch, B = 32, T = 2048, V = 8192, d = 736, bigram 10240 × 128; bf16 tables,
fp32 projection and gate (the model's dtypes). Forward and forward+backward, median of
triton.testing.do_bench, same random inputs for every variant, in one process.

Bytes the op must move (the floor the GB/s column is measured against; gathered rows count once per
token, N = B·T, bf16 = 2 bytes):
  forward:   ids (8N) + token rows (2dN) + bigram rows (2kN) + output (2dN) + proj (4dk) + gate (4d)
  backward:  the forward's reads again (the normalised rows must be rebuilt or stored: either way one
             N×d read) + dy (2dN) + dtok_emb (2Vd) + dbigram_table (2·NB·k) + dproj (4dk) + dgate (4d)
  fwd+bwd:   the sum of the two.
At this shape: forward ≈ 210 MB, forward+backward ≈ 440 MB.

Usage: python bench/embedding.py   (prints the table, writes bench/plots/embedding.{csv,png})
"""
from __future__ import annotations

import csv
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

B, T, V, D, NB, K = 32, 2048, 8192, 736, 10240, 128
PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def bytes_moved() -> dict[str, int]:
    """The minimum traffic of each pass (see the module docstring)."""
    n = B * T
    fwd = 8 * n + 2 * D * n + 2 * K * n + 2 * D * n + 4 * D * K + 4 * D
    fwd_reads = fwd - 2 * D * n                                  # the forward minus its output
    bwd = fwd_reads + 2 * D * n + 2 * V * D + 2 * NB * K + 4 * D * K + 4 * D
    return {"forward": fwd, "forward+backward": fwd + bwd}


def make_inputs(device):
    g = torch.Generator(device=device).manual_seed(0)
    weights = 1.0 / torch.arange(1, V + 1, dtype=torch.float32, device=device)   # Zipf-like ids
    ids = torch.multinomial(weights, B * T, replacement=True, generator=g).reshape(B, T)
    params = [
        (0.005 * torch.randn(V, D, generator=g, device=device)).bfloat16(),       # tok_emb
        (0.01 * torch.randn(NB, K, generator=g, device=device)).bfloat16(),       # bigram table
        torch.randn(D, K, generator=g, device=device) / K ** 0.5,                 # bigram proj (fp32)
        torch.randn(D, generator=g, device=device),                               # smear gate (fp32)
    ]
    return ids, [p.requires_grad_() for p in params]


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/embedding.py: no CUDA device; nothing measured.")
        return 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from triton.testing import do_bench

    import kernels
    from kernels import reference

    device = torch.device("cuda")
    ids, params = make_inputs(device)
    grad_out = torch.randn(B, T, D, device=device, dtype=torch.bfloat16)
    variants = {
        "triton (ours)": kernels.embed,
        "eager chain": reference.embed,
        "eager chain + torch.compile": torch.compile(reference.embed),
    }
    with torch.no_grad():
        expect = reference.embed(ids, *params).float()
        for name, fn in variants.items():
            err = float((fn(ids, *params).float() - expect).norm() / expect.norm())
            print(f"{name:30s} forward rel. diff vs eager chain: {err:.2e}")

    moved = bytes_moved()
    rows = []
    for name, fn in variants.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(ids, *params)

        def forward_backward(fn=fn):
            fn(ids, *params).backward(grad_out)

        for mode, call in (("forward", forward), ("forward+backward", forward_backward)):
            ms = do_bench(call, warmup=50, rep=300, grad_to_none=params, return_mode="median")
            rows.append({"variant": name, "pass": mode, "ms": ms, "GB/s": moved[mode] / ms / 1e6})

    device_name = torch.cuda.get_device_name()
    print(f"\ndevice: {device_name}; B={B} T={T} V={V} d={D} bigram {NB}x{K}, bf16 tables, fp32 proj/gate")
    print(f"bytes counted: forward {moved['forward'] / 1e6:.1f} MB, "
          f"forward+backward {moved['forward+backward'] / 1e6:.1f} MB (see the script's docstring)")
    print(f"{'variant':30s} {'pass':18s} {'ms':>9s} {'GB/s':>8s}")
    for r in rows:
        print(f"{r['variant']:30s} {r['pass']:18s} {r['ms']:9.3f} {r['GB/s']:8.0f}")

    os.makedirs(PLOTS, exist_ok=True)
    with open(os.path.join(PLOTS, "embedding.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "variant", "pass", "ms", "GB/s"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": device_name, **r})

    fig, ax = plt.subplots(figsize=(7, 4))
    passes = list(moved)
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        times = [next(r["ms"] for r in rows if r["variant"] == name and r["pass"] == p) for p in passes]
        ax.bar([j + i * width for j in range(len(passes))], times, width, label=name)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(passes))], passes)
    ax.set_ylabel("ms (median)")
    ax.set_title(f"embed, B·T={B * T}, d={D}, bf16 tables — {device_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "embedding.png"), dpi=120)
    print(f"wrote {PLOTS}/embedding.csv and embedding.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
