"""Benchmark: fused causal GQA attention + XSA (kernels.attention) vs the ways people run it today.

At the PR #1579 shape (B=32, T=2048, H=16, Hkv=8, D=46; and D=64 for comparison), bf16, forward and
forward+backward, median of triton.testing.do_bench, all providers in one process on the same random
inputs:
  ours                  kernels.attention(q, k, v, xsa=True)  (XSA fused in the epilogue)
  ours, no XSA          kernels.attention(q, k, v)            (the attention kernel alone)
  SDPA flash + XSA      F.scaled_dot_product_attention pinned to the flash backend (enable_gqa=True),
                        then XSA as torch.compile'd torch ops
  SDPA flash, no XSA    the same without XSA
  SDPA cuDNN + XSA      the cuDNN backend pinned, XSA compiled
  Flex + XSA            compiled FlexAttention with a causal block mask (enable_gqa=True), XSA compiled
Head dims the flash/cuDNN backends reject (D=46 is not a multiple of 8) are zero-padded to the next
multiple of 8 (48) with the scale kept at 1/sqrt(D); the padding and slicing are inside the timed region
and the provider's label says so. FLOPs count the true D: causal forward 4·B·H·T²·D / 2, backward 2.5×
that (the FlashAttention convention), so fwd+bwd = 3.5× the forward.

Writes bench/plots/attention.csv and bench/plots/attention.png. Without CUDA it prints a message and
exits 0 (nothing measured).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PLOTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plots")


def xsa_torch(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA on (B, T, H, D) outputs with (B, T, Hkv, D) values, GQA-aware without expanding v (the
    parameter-golf records' formulation); compiled below."""
    B, T, H, D = y.shape
    Hkv = v.shape[2]
    yg = y.view(B, T, Hkv, H // Hkv, D)
    v_hat = F.normalize(v.float(), dim=-1, eps=1e-12).unsqueeze(3)
    yf = yg.float()
    return (yf - (yf * v_hat).sum(-1, keepdim=True) * v_hat).to(y.dtype).view(B, T, H, D)


def make_providers(D: int, T: int, device):
    """name -> fn(q, k, v) -> (B, T, H, D) output, for every provider that runs on this machine."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from kernels import attention

    xsa_c = torch.compile(xsa_torch, fullgraph=True)
    scale = 1.0 / math.sqrt(D)
    pad = (-D) % 8

    def sdpa(backend, with_xsa):
        def fn(q, k, v):
            qt, kt, vt = (F.pad(t, (0, pad)) if pad else t for t in (q, k, v))
            qt, kt, vt = (t.transpose(1, 2) for t in (qt, kt, vt))
            with sdpa_kernel([backend]):
                y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
            y = y.transpose(1, 2)[..., :D]
            return xsa_c(y, v) if with_xsa else y
        return fn

    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, B=None, H=None,
                                   Q_LEN=T, KV_LEN=T, device=device)
    flex_c = torch.compile(flex_attention, fullgraph=True)

    def flex(q, k, v):
        y = flex_c(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                   scale=scale, enable_gqa=True)
        return xsa_c(y.transpose(1, 2), v)

    padded = f" (D padded to {D + pad})" if pad else ""
    return {
        "ours (fused XSA)": lambda q, k, v: attention(q, k, v, xsa=True),
        "ours, no XSA": lambda q, k, v: attention(q, k, v),
        f"SDPA flash + XSA{padded}": sdpa(SDPBackend.FLASH_ATTENTION, True),
        f"SDPA flash, no XSA{padded}": sdpa(SDPBackend.FLASH_ATTENTION, False),
        f"SDPA cuDNN + XSA{padded}": sdpa(SDPBackend.CUDNN_ATTENTION, True),
        "FlexAttention + XSA": flex,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[46, 64])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/attention.py: no CUDA device, nothing measured (this benchmark needs a GPU).")
        return 0

    import triton.testing

    from kernels import attention

    device = torch.device("cuda")
    dev_name = torch.cuda.get_device_name(device)
    B, T, H, Hkv = args.batch, args.seq, args.heads, args.kv_heads
    print(f"device: {dev_name}; torch {torch.__version__}; B={B} T={T} H={H} Hkv={Hkv} bf16, causal")
    rows = []
    for D in args.head_dims:
        torch.manual_seed(D)
        q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        dz = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
        fwd_flops = 4 * B * H * T * T * D / 2
        with torch.no_grad():   # what every provider must reproduce (it is tested against the reference)
            expected = {True: attention(q, k, v, xsa=True), False: attention(q, k, v)}
        for name, fn in make_providers(D, T, device).items():
            try:
                with torch.no_grad():
                    ref = expected["no XSA" not in name]
                    err = float((fn(q, k, v).float() - ref.float()).norm() / ref.float().norm())

                def fwd():
                    with torch.no_grad():
                        fn(q, k, v)

                def fwd_bwd():
                    torch.autograd.grad(fn(q, k, v), (q, k, v), dz)

                ms_f = triton.testing.do_bench(fwd, return_mode="median")
                ms_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
            except Exception as e:  # a baseline this torch/GPU cannot run is reported, not fatal
                print(f"D={D:3d}  {name:34s}  unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            row = dict(device=dev_name, D=D, provider=name, fwd_ms=ms_f, fwd_tflops=fwd_flops / ms_f * 1e-9,
                       fwd_bwd_ms=ms_fb, fwd_bwd_tflops=3.5 * fwd_flops / ms_fb * 1e-9, rel_err_vs_ours=err)
            rows.append(row)
            print(f"D={D:3d}  {name:34s}  fwd {ms_f:7.3f} ms {row['fwd_tflops']:6.1f} TFLOP/s   "
                  f"fwd+bwd {ms_fb:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s   rel err vs ours {err:.1e}")
        del q, k, v, dz, expected
        torch.cuda.empty_cache()

    os.makedirs(PLOTS, exist_ok=True)
    csv_path = os.path.join(PLOTS, "attention.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    png_path = os.path.join(PLOTS, "attention.png")
    plot(rows, png_path, f"{dev_name}: causal GQA attention + XSA, B={B} T={T} H={H} Hkv={Hkv} bf16")
    print(f"wrote {csv_path} and {png_path}")
    return 0


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["D"] for r in rows})
    colors = {D: f"C{i}" for i, D in enumerate(dims)}
    labels = [f"D={r['D']}  {r['provider']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.35 * len(rows) + 1.5), sharey=True)
    for ax, (key, label) in zip(axes, (("fwd_tflops", "forward"), ("fwd_bwd_tflops", "forward + backward"))):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=[colors[r["D"]] for r in rows])
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.set_xlabel("TFLOP/s (true D; backward = 2.5x forward FLOPs)")
        ax.set_title(label)
    axes[0].invert_yaxis()     # shared y axis: invert once, first row on top
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
