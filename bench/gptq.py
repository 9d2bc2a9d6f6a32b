"""Benchmark: GPTQ int6 + SDClip of all 30 block matrices of the pr1579 preset.

5 blocks × (c_q 736×736, c_k 368×736, c_v 368×736, attention proj 736×736, mlp fc 2944×736, mlp proj
736×2944). Weights are random with row std 1/sqrt(736) ≈ 0.037 (what orthogonal init gives); Hessians
are XᵀX/n of random correlated activations, one per layer input as in the model (c_q, c_k and c_v share
theirs). Timed, on the same inputs:
  ours, batched   kernels.gptq_quantize_batched, one call per distinct shape (GPU)
  ours, single    kernels.gptq_quantize, one call per matrix (GPU)
  torch reference kernels.reference.gptq_quantize, one call per matrix (the same GPU, and the CPU)
GPU times are triton.testing.do_bench medians; CPU times are medians of wall-clock runs. Goals: ours
<= 1.0 s for all 30 matrices and >= 10× the torch reference on the same GPU. The GPU rows also report the
proxy-loss ratio ours / reference and the fraction of codes that differ.

Without CUDA only the CPU reference is timed (the GPU rows are printed as not measured). --quick times
one matrix per shape and multiplies by the shape's count (marked "est.") instead of every matrix.
Prints a table and writes bench/plots/gptq.csv and bench/plots/gptq.png.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import kernels  # noqa: E402
from kernels import reference  # noqa: E402

D, HIDDEN, KV_DIM, BLOCKS = 736, 2944, 368, 5
# (name, (N, K), input whose Hessian it uses)
LAYERS = [("attn.c_q", (D, D), "attn_in"), ("attn.c_k", (KV_DIM, D), "attn_in"), ("attn.c_v", (KV_DIM, D), "attn_in"),
          ("attn.proj", (D, D), "proj_in"), ("mlp.fc", (HIDDEN, D), "fc_in"), ("mlp.proj", (D, HIDDEN), "mlp_proj_in")]
GOAL_TOTAL_S, GOAL_SPEEDUP = 1.0, 10.0
PLOTS = pathlib.Path(__file__).resolve().parent / "plots"


def make_problem(device: str, seed: int = 0):
    """The 30 (name, weight, hessian) triples on `device`; Hessians of random correlated activations
    (n = 2K samples with a GPU to multiply them, K/2 on a CPU alone, where the XᵀX products would
    otherwise dominate the run)."""
    g = torch.Generator().manual_seed(seed)
    problem = []
    for b in range(BLOCKS):
        hessians = {}
        for name, (n_out, k), source in LAYERS:
            if source not in hessians:
                n = 2 * k if device != "cpu" else k // 2
                mix = torch.randn(k, k, generator=g) * torch.logspace(0, -1.5, k)[:, None]
                x = torch.randn(n, k, generator=g).to(device) @ mix.to(device)
                hessians[source] = x.T @ x / n
            w = (torch.randn(n_out, k, generator=g) / math.sqrt(D)).to(device)
            problem.append((f"blocks.{b}.{name}", w, hessians[source]))
    return problem


def by_shape(problem):
    groups: dict[tuple[int, int], list] = {}
    for name, w, h in problem:
        groups.setdefault(tuple(w.shape), []).append((name, w, h))
    return groups


def do_bench_s(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=1, rep=50, return_mode="median") / 1e3


def wall_median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_all(groups, quantize):
    for entries in groups.values():
        for _, w, h in entries:
            quantize(w, h)


def time_cpu_reference(groups, quick: bool):
    """Seconds per shape for the reference on the CPU (every matrix, or one per shape with --quick)."""
    rows = {}
    for shape, entries in groups.items():
        timed = entries[:1] if quick else entries
        per = [wall_median_s(lambda w=w, h=h: reference.gptq_quantize(w, h), repeats=1) for _, w, h in timed]
        rows[shape] = statistics.mean(per) * len(entries)
    return rows


def time_gpu(groups):
    """Seconds per shape for ours (batched and single) and the reference on the GPU, plus quality."""
    stacked = {shape: (torch.stack([w for _, w, _ in e]), torch.stack([h for _, _, h in e]))
               for shape, e in groups.items()}
    ours_batched, ours_single, ref_gpu, quality = {}, {}, {}, {}
    for shape, entries in groups.items():
        W, H = stacked[shape]
        codes, scales = kernels.gptq_quantize_batched(W, H)        # also runs the autotuner once
        ours_batched[shape] = do_bench_s(lambda: kernels.gptq_quantize_batched(W, H))
        _, w0, h0 = entries[0]
        ours_single[shape] = do_bench_s(lambda: kernels.gptq_quantize(w0, h0)) * len(entries)
        ref_gpu[shape] = wall_median_s(lambda: (reference.gptq_quantize(w0, h0), torch.cuda.synchronize()),
                                       repeats=3) * len(entries)
        ratios, mismatch = [], []
        for i, (_, w, h) in enumerate(entries):
            ref_codes, ref_scales = reference.gptq_quantize(w, h)
            ratios.append(float(reference.quantization_proxy_loss(w, h, codes[i], scales[i]) /
                                reference.quantization_proxy_loss(w, h, ref_codes, ref_scales)))
            mismatch.append(float((codes[i] != ref_codes).float().mean()))
        quality[shape] = (statistics.mean(ratios), max(mismatch))
    end_to_end = do_bench_s(lambda: [kernels.gptq_quantize_batched(*stacked[s]) for s in stacked])
    return ours_batched, ours_single, ref_gpu, quality, end_to_end


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="time one matrix per shape on the CPU and extrapolate")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a shared, oversubscribed CPU, "
                             "where thread spinning makes the reference tens of times slower)")
    args = parser.parse_args(argv)
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "no CUDA device"
    print(f"GPTQ int6 + SDClip, pr1579 block matrices ({len(LAYERS) * BLOCKS}); GPU: {device_name}; "
          f"CPU: {torch.get_num_threads()} threads; torch {torch.__version__}")

    problem = make_problem("cuda" if cuda else "cpu")
    cpu_groups = by_shape([(name, w.cpu(), h.cpu()) for name, w, h in problem])   # the same inputs
    cpu_ref = time_cpu_reference(cpu_groups, args.quick)
    est = " est." if args.quick else ""
    if cuda:
        gpu = time_gpu(by_shape(problem))
    else:
        print("No CUDA device: the GPU rows (ours and the torch reference on the GPU) are NOT measured.")
        gpu = None

    fmt = lambda x: "not measured" if x is None else x if isinstance(x, str) else f"{x:.4f}"  # noqa: E731
    header = ["shape (N×K)", "count", "ours batched GPU s", "ours single GPU s", "ref GPU s", f"ref CPU s{est}",
              "proxy ours/ref", "codes differ"]
    records = []
    for shape, entries in cpu_groups.items():
        ob, os_, rg = ((gpu[0][shape], gpu[1][shape], gpu[2][shape]) if gpu else (None, None, None))
        q = gpu[3][shape] if gpu else None
        records.append([f"{shape[0]}×{shape[1]}", len(entries), ob, os_, rg, cpu_ref[shape],
                        None if q is None else q[0], None if q is None else q[1]])
    totals = ["total", sum(r[1] for r in records)] + [
        None if any(r[i] is None for r in records) else sum(r[i] for r in records) for i in (2, 3, 4, 5)] + ["-", "-"]
    print(" | ".join(header))
    for r in records + [totals]:
        print(" | ".join([str(r[0]), str(r[1])] + [fmt(x) for x in r[2:]]))

    if gpu:
        end_to_end = gpu[4]
        speedup = totals[4] / end_to_end
        print(f"ours, all {totals[1]} in one sequence of {len(records)} batched calls: {end_to_end:.4f} s")
        print(f"goal <= {GOAL_TOTAL_S} s for all {totals[1]}: {'MET' if end_to_end <= GOAL_TOTAL_S else 'NOT MET'} "
              f"({end_to_end:.4f} s)")
        print(f"goal >= {GOAL_SPEEDUP}× the torch reference on the same GPU: "
              f"{'MET' if speedup >= GOAL_SPEEDUP else 'NOT MET'} ({speedup:.1f}×)")
        print(f"vs the torch reference on the CPU: {totals[5] / end_to_end:.1f}×")
    else:
        print(f"goals (<= {GOAL_TOTAL_S} s for all {totals[1]} on the GPU, >= {GOAL_SPEEDUP}× the torch reference on the "
              f"same GPU): not measured without a GPU")

    PLOTS.mkdir(parents=True, exist_ok=True)
    with open(PLOTS / "gptq.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["device", "quick"] + header)
        for r in records + [totals]:
            out.writerow([device_name, args.quick] + ["not measured" if x is None else x for x in r])
    _plot(records, device_name, est)
    print(f"wrote {PLOTS / 'gptq.csv'} and {PLOTS / 'gptq.png'}")
    return 0


def _plot(records, device_name, est):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = [("ours batched (GPU)", 2), ("ours single (GPU)", 3), ("torch ref (GPU)", 4), (f"torch ref (CPU){est}", 5)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.2
    for i, (label, col) in enumerate(series):
        values = [r[col] for r in records]
        if any(v is None for v in values):
            continue
        ax.bar([x + i * width for x in range(len(records))], values, width, label=label)
    ax.set_xticks([x + 1.5 * width for x in range(len(records))], [f"{r[0]} ×{r[1]}" for r in records])
    ax.set_yscale("log")
    ax.set_ylabel("seconds for all matrices of the shape")
    ax.set_title(f"GPTQ int6 + SDClip, pr1579 block matrices ({device_name})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOTS / "gptq.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
