"""The summary table train.py prints at the end of a run: one (label, value) row per result, built from
the run's summaries (training, baselines, each quantisation plan, the artifact's evaluations)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def summary_rows(*, preset: str, train: dict, report: dict, quantization: list[tuple[str, dict]] | None,
                 artifact: dict | None, eval_stride: int, ttt_reduced: bool, artifact_path: Path | None,
                 out_dir: Path) -> list[tuple[str, str]]:
    """The table's rows. `train` is the training summary (crawler.training.loop), `report` holds the
    baseline and evaluation results and timings, `quantization` the (label, summary) of every plan
    measured (None when the run did not quantise) and `artifact` the summary of the written one.
    `ttt_reduced` says the TTT epochs were cut down for the CPU."""
    s = train
    rows = [("preset / parameters", f"{preset} / {s['n_params']:,}"),
            ("steps", f"{s['steps']} ({s['steps_this_session']} this session)"),
            ("train time", f"{s['train_time_ms'] / 1000:.1f} s"),
            ("step_avg", f"{_fmt(s['step_avg_ms'], '.2f')} ms"),
            ("tokens/s (this session)", _fmt(s["tokens_per_s"], ",.0f")),
            ("val tokens scored", f"{s['val_tokens']:,}"),
            ("documents (training and every val_bpb)",
             "isolated at each BOS" if report.get("doc_isolated") else "attention crosses BOS")]
    if "unigram_val_bpb" in report:
        rows.append(("unigram baseline val_bpb", _fmt(report["unigram_val_bpb"])))
    rows += [("untrained val_bpb", _fmt(s["initial_val_bpb"])),
             ("last-step val_bpb", _fmt(s["last_step_val_bpb"])),
             (f"pre-quant val_bpb ({s['averaging'] or 'raw weights'})", _fmt(s["final_val_bpb"]))]
    if quantization:
        for label, r in quantization:
            rows.append((f"int6 round trip {label}",
                         f"{_fmt(r['quant_val_bpb'])} (gap {r['quant_gap_bpb']:+.4f}, "
                         f"{r['quantize_total_seconds']:.1f} s; tok_emb {r['tok_emb_scheme']})"))
        a = artifact
        shared = " (Hessians shared with an earlier plan)" if a["hessians_reused"] else ""
        source = "" if a.get("code_bytes_source") is None else f", {a['code_bytes_source']:,} as source files"
        rows += [("artifact + code bytes",
                  f"{a['artifact_bytes']:,} + {a['code_bytes']:,} = {a['total_bytes']:,} "
                  f"(code = train_gpt.py{source}; budget {a['budget']:,}: "
                  f"{'fits' if a['fits'] else 'OVER'}; {a['pruned']:,} ±1 codes pruned)"),
                 ("quantisation time (Hessians + GPTQ)", f"{a['quantize_total_seconds']:.1f} s{shared}"),
                 ("int6 val_bpb: plain", _fmt(a["quant_val_bpb"]))]
        if "sliding_val_bpb" in report:
            rows.append((f"int6 val_bpb: sliding window, stride {eval_stride}",
                         f"{_fmt(report['sliding_val_bpb'])} ({report['sliding_seconds']:.0f} s)"))
        if "ttt_val_bpb" in report:
            reduced = " (reduced from 3 on CPU)" if ttt_reduced else ""
            rows.append((f"int6 val_bpb: legal TTT, {report['ttt_epochs']} epoch(s){reduced}",
                         f"{_fmt(report['ttt_val_bpb'])} ({report['ttt_seconds']:.0f} s)"))
        rows.append(("artifact", str(artifact_path)))
    rows.append(("out dir", str(out_dir)))
    return rows


def print_table(rows: list[tuple[str, str]], log: Callable[[str], None] = print) -> None:
    """The rows as two aligned columns between rules of '='."""
    width = max(len(k) for k, _ in rows)
    log("=" * (width + 30))
    for key, value in rows:
        log(f"{key:<{width}}  {value}")
    log("=" * (width + 30))
