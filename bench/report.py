"""Benchmark records -> speed-ups, a text table, one CSV and one PNG (shared by every benchmark).

A record is the flat dict `bench.harness.Bench.record` stores (and pytest-benchmark's JSON carries in
`extra_info`): benchmark, group, impl, role ("ours" | "baseline"), device, median_ms, q20_ms, q80_ms,
metrics {name: value}. Within one (benchmark, group) the speed-up of ours over a baseline is
baseline median / ours median: both measured in the same run, on the same inputs and device.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

COLUMNS = ("benchmark", "group", "impl", "role", "device", "median_ms", "q20_ms", "q80_ms", "speedup_of_ours")


def speedups(records: list[dict]) -> dict[tuple[str, str, str], float | None]:
    """(benchmark, group, impl) -> how many times faster ours is than this impl (None when the group has
    no measured `ours`; 1.0 for ours itself)."""
    ours = {(r["benchmark"], r["group"]): r["median_ms"] for r in records if r["role"] == "ours"}
    out = {}
    for r in records:
        base = ours.get((r["benchmark"], r["group"]))
        out[(r["benchmark"], r["group"], r["impl"])] = None if base is None else r["median_ms"] / base
    return out


def format_number(x) -> str:
    """Numbers to 3-4 significant digits for tables; None as an en dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def format_metrics(metrics: dict) -> str:
    """'TFLOP/s 412.3, peak_MiB 1024' (None-valued metrics left out)."""
    return ", ".join(f"{k} {format_number(v)}" for k, v in metrics.items() if v is not None and not isinstance(v, list))


def grouped(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(benchmark, group) -> its records, groups in the order they first appear, ours first in each."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["benchmark"], r["group"]), []).append(r)
    return {key: sorted(rs, key=lambda r: r["role"] != "ours") for key, rs in groups.items()}


def text_table(records: list[dict]) -> list[str]:
    """One line per record under its group, with the speed-up of ours over each baseline; list-valued
    metrics (e.g. a profile) one entry per line below."""
    ratio = speedups(records)
    lines = []
    for (benchmark, group), rs in grouped(records).items():
        lines.append(f"{benchmark}: {group}  [{rs[0]['device']}]")
        for r in rs:
            s = ratio[(benchmark, group, r["impl"])]
            vs = "" if r["role"] == "ours" or s is None else f"  speed-up of ours {s:.3g}x"
            lines.append(f"    {r['impl']:<48} {r['median_ms']:>10.4f} ms{vs}  {format_metrics(r['metrics'])}")
            for name, entries in r["metrics"].items():
                if isinstance(entries, list):
                    lines.append(f"      {name}:")
                    lines.extend(f"        {entry}" for entry in entries)
    return lines


def summary_lines(records: list[dict]) -> list[str]:
    """One line per group: ours' median and its speed-up over each baseline (for a log's last screen)."""
    ratio = speedups(records)
    lines = []
    for (benchmark, group), rs in grouped(records).items():
        ours = [r for r in rs if r["role"] == "ours"]
        head = f"{benchmark}: {group}: " + (f"ours {format_number(ours[0]['median_ms'])} ms" if ours else "no ours")
        parts = [f"{r['impl']} {ratio[(benchmark, group, r['impl'])]:.3g}x" for r in rs
                 if r["role"] == "baseline" and ratio[(benchmark, group, r["impl"])] is not None]
        lines.append(head + ("; vs " + ", ".join(parts) if parts else ""))
    return lines


def write_atomic(path: Path, write) -> None:
    """Write `path` through a temp file in its folder and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(records: list[dict], path: Path) -> None:
    """All records in one CSV: the common columns, then one column per metric name seen."""
    ratio = speedups(records)
    metric_names = list(dict.fromkeys(k for r in records for k, v in r["metrics"].items() if not isinstance(v, list)))

    def write(f):
        w = csv.writer(f)
        w.writerow([*COLUMNS, *metric_names])
        for r in records:
            s = ratio[(r["benchmark"], r["group"], r["impl"])]
            w.writerow([r["benchmark"], r["group"], r["impl"], r["role"], r["device"], r["median_ms"], r["q20_ms"],
                        r["q80_ms"], "" if s is None else s, *(r["metrics"].get(m, "") for m in metric_names)])

    write_atomic(path, write)


def plot(records: list[dict], path: Path) -> bool:
    """One PNG, one panel per benchmark: the speed-up of ours over each baseline of every group (log
    scale, 1 = as fast). Returns False (no file) when no group has both ours and a baseline."""
    ratio = speedups(records)
    panels: dict[str, list[tuple[str, float]]] = {}
    for r in records:
        s = ratio[(r["benchmark"], r["group"], r["impl"])]
        if r["role"] == "baseline" and s is not None:
            panels.setdefault(r["benchmark"], []).append((f"{r['group']} | vs {r['impl']}", s))
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [0.8 + 0.22 * len(bars) for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (name, bars) in zip(axes[:, 0], panels.items()):
        labels, values = zip(*bars)
        ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
        ax.set_yticks(range(len(bars)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{name}: speed-up of ours (baseline median / ours median)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"bench — {records[0]['device']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
