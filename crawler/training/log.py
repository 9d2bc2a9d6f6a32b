"""What a run prints: its log (stdout and `out_dir/train.log`, main rank only) and the line formats.

The lines parameter-golf's tooling parses keep the names and precision the seed's train_gpt.py prints:
`step:N/M train_loss:... train_time:...ms step_avg:...ms` (and `val_loss`/`val_bpb`), `model_params:N`,
`stopping_early: wallclock_cap ...`, `peak memory allocated: ... MiB reserved: ... MiB`, `swa_eval` /
`ema_eval`, and each final score as a rounded line plus an `_exact` line with 8 decimals
(`final_int6_roundtrip_exact`, `final_int6_sliding_window_exact`, `legal_ttt_exact`). The progress line
(budget used, tokens/s, ETA) is ours.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch


class RunLogger:
    """Lines to stdout and `out_dir/train.log` (appended, so a resumed run continues the log; the
    directory is created with the first line), from the main rank only."""

    def __init__(self, out_dir: Path | None, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.path = Path(out_dir) / "train.log" if (out_dir is not None and enabled) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, file=self.stream, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def format_seconds(s: float) -> str:
    """`1h02m03s` from one hour up, else `2m03s`."""
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_line(step: int, iterations: int, rest: str, time_ms: float) -> str:
    """A parameter-golf log line; step_avg = training time (no validation, no warm-up) per step."""
    return f"step:{step}/{iterations} {rest} train_time:{time_ms:.0f}ms step_avg:{time_ms / max(step, 1):.2f}ms"


def progress_line(step: int, iterations: int, *, done: int, session_ms: float, time_ms: float,
                  batch_tokens: int, max_wallclock_ms: float | None) -> str:
    """Progress: steps and budget used, tokens/s of this session (`done` steps in `session_ms`), and the
    ETA of the training budget (iterations, capped by the wall-clock budget when there is one)."""
    tok_s = done * batch_tokens / max(session_ms, 1e-9) * 1000.0
    eta = (iterations - step) * session_ms / max(done, 1) / 1000.0
    budget = f"step {step}/{iterations}"
    if max_wallclock_ms:
        eta = min(eta, max(max_wallclock_ms - time_ms, 0.0) / 1000.0)
        budget += f", {time_ms / max_wallclock_ms:.0%} of {max_wallclock_ms / 1000:.0f}s"
    return (f"progress: {budget} | {tok_s:,.0f} tok/s | train {format_seconds(time_ms / 1000.0)} | "
            f"ETA {format_seconds(eta)}")


def model_params_line(n_params: int) -> str:
    """The parameter count (the seed's `model_params:38346836`)."""
    return f"model_params:{n_params}"


def stopping_early_line(step: int, iterations: int, time_ms: float) -> str:
    """Logged after the last validation when the wall-clock cap ended training before `iterations`."""
    return f"stopping_early: wallclock_cap train_time:{time_ms:.0f}ms step:{step}/{iterations}"


def peak_memory_line(device: torch.device) -> str | None:
    """The CUDA allocator's peak allocated / reserved memory in MiB (floored); None off CUDA, where no
    allocator keeps these figures."""
    if torch.device(device).type != "cuda":
        return None
    mib = 1024 * 1024
    return (f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // mib} MiB "
            f"reserved: {torch.cuda.max_memory_reserved(device) // mib} MiB")


def score_line(name: str, val_loss: float, val_bpb: float, *, eval_ms: float | None = None, extra: str = "") -> str:
    """`{name} val_loss:{:.4f} val_bpb:{:.4f}{extra}[ eval_time:{ms}ms]`, e.g. `swa_eval val_loss:...` or
    `final_int6_sliding_window val_loss:... val_bpb:... stride:64 eval_time:57395ms`."""
    timing = f" eval_time:{eval_ms:.0f}ms" if eval_ms is not None else ""
    return f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}{extra}{timing}"


def exact_line(name: str, val_loss: float, val_bpb: float) -> str:
    """`{name}_exact val_loss:{:.8f} val_bpb:{:.8f}`: the full-precision line log parsers read."""
    return f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}"
