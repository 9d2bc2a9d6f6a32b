"""What a training run prints: its log (stdout and `out_dir/train.log`, main rank only) and the line
formats, the parameter-golf ones (`step:N/M train_loss:... train_time:...ms step_avg:...ms`) plus the
progress line (budget used, tokens/s, ETA)."""
from __future__ import annotations

import sys
from pathlib import Path


class RunLogger:
    """Lines to stdout and `out_dir/train.log` (appended, so a resumed run continues the log), from the
    main rank only."""

    def __init__(self, out_dir: Path | None, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.path = out_dir / "train.log" if (out_dir is not None and enabled) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, file=self.stream, flush=True)
        if self.path is not None:
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
