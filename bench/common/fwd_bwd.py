"""Forward and forward+backward timing (triton.testing.do_bench, median) and peak memory of several
implementations of one op on the same inputs, printed as a table and written as CSV + PNG."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

PLOTS = Path(__file__).resolve().parents[1] / "plots"
FIELDS = ("case", "impl", "fwd_ms", "fwd_bwd_ms", "peak_mib")


def require_cuda(script: str) -> None:
    """Exit 0 with a message on a machine without CUDA: nothing can be measured there."""
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device found; this benchmark needs a GPU, nothing measured.")
        sys.exit(0)


def measure(forward, leaves, grad) -> dict:
    """Median ms of forward() and of forward().backward(grad) (grads of `leaves` reset each time),
    and the peak memory (MiB) one forward+backward allocates on top of what is already allocated."""
    from triton.testing import do_bench

    def step():
        forward().backward(grad)

    fwd_ms = do_bench(forward, return_mode="median")
    fwd_bwd_ms = do_bench(step, grad_to_none=leaves, return_mode="median")
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in leaves:
        t.grad = None
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_mib": peak}


def report(name: str, title: str, rows: list[dict]) -> None:
    """Print the table (with the device) and write bench/plots/<name>.csv and <name>.png."""
    device = torch.cuda.get_device_name()
    print(f"{title} on {device} (torch {torch.__version__})")
    print(f"{'case':<28}{'impl':<18}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>11}")
    for r in rows:
        print(f"{r['case']:<28}{r['impl']:<18}{r['fwd_ms']:>10.3f}{r['fwd_bwd_ms']:>12.3f}{r['peak_mib']:>11.0f}")
    PLOTS.mkdir(parents=True, exist_ok=True)
    with open(PLOTS / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=("device",) + FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": device, **{k: r[k] for k in FIELDS}})

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['case']}\n{r['impl']}" for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows)), 4.5))
    ax_t.bar(labels, [r["fwd_bwd_ms"] for r in rows], label="forward+backward")
    ax_t.bar(labels, [r["fwd_ms"] for r in rows], label="forward")
    ax_t.set_ylabel("ms (median)")
    ax_t.legend()
    ax_m.bar(labels, [r["peak_mib"] for r in rows], color="tab:gray")
    ax_m.set_ylabel("peak extra memory, MiB")
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{title} — {device}")
    fig.tight_layout()
    fig.savefig(PLOTS / f"{name}.png", dpi=120)
    print(f"wrote {PLOTS / (name + '.csv')} and {PLOTS / (name + '.png')}")
