"""`make gpu-check`: the whole GPU validation as one command inside a time budget, leaving what it
measured in one folder.

    python -m bench.gpu_check [--budget-s S] [--out DIR] [--list-only]

Stages, each logged with its command, time and outcome:
  1. environment   GPU, driver, torch / triton / Python versions, commit, Triton cache folder
  2. build check   `python -m kernels.build_check --all --jobs N --json OUT/build_check.json`: every kernel ×
                   config compiled in parallel into the Triton cache that the tests and benchmarks then
                   load (skipped without CUDA, or while kernels/build_check.py does not exist)
  3. GPU tests     `pytest -m gpu tests --junitxml=OUT/gpu_tests.xml`
  4. benchmarks    `pytest bench/test_*.py --benchmark-json=OUT/bench.json`, most important first, with
                   repetitions sized to the time left and a deadline after which no case starts
  5. results       OUT/RESULTS.md: bench/RESULTS.md with its GPU section generated from OUT/bench.json
Files under OUT (the device machine returns at most 8, none deeper than two folders): gpu_check.log
(everything printed), build_check.json, gpu_tests.xml, bench.json, bench.csv, bench_plots.png, RESULTS.md.

Budget: --budget-s, else GPU_CHECK_BUDGET_S, else 420 s. Each stage gets a cap (a share of the budget,
never more than leaves the later stages their minimum); one that would start with less than its minimum
is skipped, saying so; one that reaches its cap is interrupted (SIGINT, then killed), and the next
stages still run, so partial results always come back. OUT: --out, else GPU_CHECK_OUT, else $OUT (the
device tool's folder), else runs/gpu-check-<time>. The commit is $BENCH_COMMIT (the GPU machine's copy
of the tree has no git metadata), else git's.
--list-only prints what stages 2-4 would run instead of running them (stage 5 still writes RESULTS.md):
the quick dry run of this driver.
Exit status: 0 when every stage passed or was skipped for a stated reason other than time, 1 when a
stage failed, 3 when none failed but the budget cut a stage short or skipped it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import harness, report, results

REPO = harness.REPO
DEFAULT_BUDGET_S = 420.0
# Benchmarks in the order they run: what matters most first, so a short budget still measures it.
BENCH_ORDER = ("step_time", "attention", "embedding", "int6", "mlp", "cross_entropy", "gptq")
INTERRUPT_GRACE_S = 20.0      # after SIGINT, before SIGKILL: pytest writes its JSON / junit meanwhile
RESULTS_RESERVE_S = 10.0      # kept back for the results stage and the summary
BENCH_FINISH_S = 20.0         # the benchmarks' deadline is this long before their cap (session finish, JSON)
LOG_NAME = "gpu_check.log"
FAILED, CUT, OK, SKIPPED, LISTED = "FAILED", "CUT SHORT", "ok", "skipped", "listed"


@dataclass
class Stage:
    """One stage: its share of the budget (cap), the least time worth starting it with, and its outcome."""
    name: str
    share: float
    min_s: float
    status: str = "not run"
    seconds: float = 0.0
    note: str = ""


class Log:
    """Every line to stdout and to the one log file, flushed at once (the tail is what comes back first)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str = "") -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")

    def close(self) -> None:
        self.file.close()


class Clock:
    """Seconds since the start and left of the budget."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def out_dir(arg: str | None) -> Path:
    """--out, else $GPU_CHECK_OUT, else $OUT, else runs/gpu-check-<time> in the repository."""
    chosen = arg or os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT")
    path = Path(chosen) if chosen else REPO / "runs" / time.strftime("gpu-check-%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def child_env(commit: str) -> dict[str, str]:
    """The environment of every stage: the tree importable, output unbuffered, the commit named."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_COMMIT=commit)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in [str(Path(p).resolve()) for p in paths]:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *paths])
    return env


def run_command(cmd: list[str], *, timeout_s: float, env: dict, log: Log) -> tuple[int | None, bool]:
    """Run cmd in the repository with its output streamed into the log; at timeout_s interrupt its whole
    process group (SIGINT, then SIGKILL after INTERRUPT_GRACE_S). Returns (exit code, cut short)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    cut = False
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        cut = True
        log(f"--- time cap of {timeout_s:.0f} s reached: interrupting (SIGINT) ---")
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            log("--- still running: killed ---")
    finally:
        _signal_group(proc, signal.SIGKILL)      # workers it left behind too (a new session outlives us)
        proc.wait()
        reader.join(timeout=5)
    return proc.returncode, cut


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def environment_facts(commit: str) -> tuple[list[str], bool]:
    """Lines describing the machine and software, and whether a CUDA device is usable."""
    import torch
    import triton
    lines = [f"commit: {commit}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"torch: {torch.__version__} (CUDA runtime {torch.version.cuda})", f"triton: {triton.__version__}",
             f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
             f"triton cache: {os.environ.get('TRITON_CACHE_DIR', Path.home() / '.triton' / 'cache')}"]
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            lines.append(f"nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi: not available ({e})")
    else:
        lines.append("GPU: no CUDA device: the CUDA stages skip (build check) or their cases skip (tests, benchmarks)")
    return lines, cuda


def bench_files() -> list[str]:
    """bench/test_*.py in BENCH_ORDER, then any benchmark the order does not name yet."""
    names = list(results.listed_benchmarks())
    ordered = [n for n in BENCH_ORDER if n in names] + [n for n in names if n not in BENCH_ORDER]
    return [f"bench/test_{n}.py" for n in ordered]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                        help=f"total seconds (default $GPU_CHECK_BUDGET_S or {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", default=None,
                        help="output folder (default $GPU_CHECK_OUT, $OUT, runs/gpu-check-<time>)")
    parser.add_argument("--list-only", action="store_true", help="list stages 2-4 instead of running them")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")

    clock = Clock(args.budget_s)
    out = out_dir(args.out)
    log = Log(out / LOG_NAME)
    commit = harness.source_commit()
    env = child_env(commit)
    stages = [Stage("environment", 0.0, 0.0), Stage("build check", 0.25, 20.0), Stage("GPU tests", 0.30, 30.0),
              Stage("benchmarks", 1.0, 30.0), Stage("results", 0.0, 0.0)]
    env_stage, build, tests, benches, res = stages
    log(f"gpu-check: budget {args.budget_s:.0f} s, output {out}, {'LIST ONLY' if args.list_only else 'running'}")

    def begin(stage: Stage) -> None:
        log("")
        log(f"=== [{stages.index(stage) + 1}/{len(stages)}] {stage.name} (t = {clock.elapsed():.0f} s) ===")

    def cap(stage: Stage) -> float:
        later = stages[stages.index(stage) + 1:]
        room = clock.left() - RESULTS_RESERVE_S - sum(s.min_s for s in later)
        return min(stage.share * args.budget_s, room)

    def run_stage(stage: Stage, cmd: list[str], *, timeout_s: float | None = None) -> int | None:
        begin(stage)
        timeout_s = cap(stage) if timeout_s is None else timeout_s
        log(f"$ {shlex.join(cmd)}   (cap {timeout_s:.0f} s)")
        if args.list_only:
            stage.status, stage.note = LISTED, "not run (--list-only)"
            return None
        if timeout_s < stage.min_s:
            stage.status = SKIPPED
            stage.note = f"time budget: {timeout_s:.0f} s left for it, needs >= {stage.min_s:.0f} s"
            log(f"skipped: {stage.note}")
            return None
        start = time.monotonic()
        code, cut = run_command(cmd, timeout_s=timeout_s, env=env, log=log)
        stage.seconds = time.monotonic() - start
        stage.status = CUT if cut else OK if code == 0 else FAILED
        stage.note = f"exit {code}" + (f", interrupted at its {timeout_s:.0f} s cap" if cut else "")
        return code

    # 1. environment
    begin(env_stage)
    start = time.monotonic()
    facts, cuda = environment_facts(commit)
    for line in facts:
        log(line)
    env_stage.status, env_stage.seconds = OK, time.monotonic() - start

    # 2. build check: fills the Triton cache for this GPU; needs the module and a GPU.
    build_cmd = [sys.executable, "-m", "kernels.build_check", "--all", "--jobs", str(os.cpu_count() or 16),
                 "--json", str(out / "build_check.json")]
    if not (REPO / "kernels" / "build_check.py").exists():
        begin(build)
        build.status, build.note = SKIPPED, "kernels/build_check.py does not exist in this tree yet"
        log(f"skipped: {build.note}")
    elif not cuda and not args.list_only:
        begin(build)
        build.status, build.note = SKIPPED, ("no CUDA device: the Triton cache is filled on the GPU machine only "
                                             "(`python -m kernels.build_check` is the offline sm_90 check)")
        log(f"skipped: {build.note}")
    else:
        run_stage(build, build_cmd)

    # 3. GPU tests
    run_stage(tests, [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
                      f"--junitxml={out / 'gpu_tests.xml'}"])

    # 4. benchmarks, with a deadline inside their cap; repetitions sized from it by bench/conftest.py
    bench_cap = clock.left() - RESULTS_RESERVE_S
    deadline = time.time() + bench_cap - BENCH_FINISH_S
    env["BENCH_COMMAND"] = f"make gpu-check (benchmark stage: pytest {' '.join(bench_files())})"
    run_stage(benches, [sys.executable, "-m", "pytest", *bench_files(), "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={out / 'bench.json'}", "--benchmark-columns=median,iqr,rounds",
                        f"--bench-out={out}", f"--bench-deadline={deadline:.0f}"], timeout_s=bench_cap)

    # 5. results
    begin(res)
    bench_json = out / "bench.json"
    records = []
    try:
        if bench_json.exists():
            records, _ = results.load_json(bench_json)
        else:
            log("no bench.json (no benchmark ran): every GPU row says not measured")
        n = results.write_results(bench_json if bench_json.exists() else None, results.RESULTS_MD,
                                  out / "RESULTS.md", command=env["BENCH_COMMAND"])
        res.status, res.note = OK, f"{n} measured cases -> {out / 'RESULTS.md'}"
    except results.ResultsError as e:
        res.status, res.note = FAILED, str(e)
    log(res.note)

    # summary: last, so the tail of the output holds it
    log("")
    log(f"=== summary ({clock.elapsed():.0f} s of a {args.budget_s:.0f} s budget) ===")
    for s in stages:
        log(f"{s.name:<12} {s.status:<10} {s.seconds:7.1f} s  {s.note}")
    if records:
        log("speed-ups of ours (baseline median / ours median, same run):")
        for line in report.summary_lines(records):
            log(f"  {line}")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    log(f"files in {out} ({len(files)}; the device tool returns at most 8): "
        + ", ".join(f"{p.relative_to(out)} ({p.stat().st_size / 1e3:.0f} kB)" for p in files))
    statuses = {s.status for s in stages}
    code = 1 if FAILED in statuses else 3 if CUT in statuses or any("time budget" in s.note for s in stages) else 0
    log(f"gpu-check: exit {code}")
    log.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
