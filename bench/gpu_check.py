"""`make gpu-check`: the whole GPU validation as one command inside a time budget, most valuable first,
leaving what it measured in one folder.

    python -m bench.gpu_check [--budget-s S] [--out DIR] [--list-only]

Stages, in order, each logged with its command, cap, time and outcome:
  1. environment        GPU, driver, torch / triton / Python versions, commit, Triton cache folder, and every
                        package of pyproject.toml this Python lacks, with the command that prepares their wheels
  2. build check        `python -m kernels.build_check --all --jobs <cores>`: every kernel x config compiled in
                        parallel into the Triton cache that the later stages load (skipped without CUDA)
  3. kernel tests       `pytest -m gpu` on the kernel test modules (torch + triton only): every candidate
                        config of every op first (tests/test_gpu_configs.py), then the paths, then real shapes
  4. kernel benchmarks  attention, int6, embedding, cross-entropy, MLP, GPTQ, each op's headline case first
                        (--bench-headline-first), with a deadline and repetitions sized to the time left
  5. step benchmark     the compiled training step, ours and the seed's
  6. model tests        every other `pytest -m gpu` test: the compiled whole model, trainer, evaluation
  7. results            OUT/RESULTS.md (bench/RESULTS.md with its GPU section generated from OUT/bench.json),
                        bench.csv and bench_plots.png from every benchmark record
Every pytest stage collects with --continue-on-collection-errors: a module that does not import is
reported as a failure (the stage's note names it) and the others still run.

Sizing. Each stage has an estimate, from bench/compile_seconds.json (the build check's measured compile
seconds, `python -m kernels.build_check --all --seconds bench/compile_seconds.json`; see `estimates`), and
a minimum worth starting with. At its start a stage gets its estimate (never more than is left); the kernel
benchmarks get what the step benchmark's estimate leaves, the model tests what is left at the end: a less
valuable stage never takes time from a more valuable one. A stage that would start with less than its
minimum is skipped, saying so; one that reaches its cap is interrupted (SIGINT, then killed) and the next
stages still run, so partial results always come back. `--list-only` prints the plan (stages, commands,
estimates, caps) and runs none of stages 2-6 (stage 7 still writes RESULTS.md): the quick dry run.

Budget: --budget-s, else GPU_CHECK_BUDGET_S, else 420 s (the check ends within 8 minutes). OUT: --out,
else GPU_CHECK_OUT, else $OUT (the device tool's folder), else runs/gpu-check-<time>; at most 7 files,
none in sub-folders: gpu_check.log (everything printed), build_check.json, gpu_tests.xml (both test stages),
bench.json (both benchmark stages), bench.csv, bench_plots.png, RESULTS.md. The commit is $BENCH_COMMIT
(the GPU machine's copy of the tree has no git metadata), else git's.
Exit status: 0 when every stage passed or was skipped for a stated reason other than time, 1 when a
stage failed, 3 when none failed but the budget cut a stage short or skipped it.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from bench import harness, report, results

REPO = harness.REPO
DEFAULT_BUDGET_S = 420.0
COMPILE_SECONDS = REPO / "bench" / "compile_seconds.json"
# The kernel test modules (they import torch, triton and kernels/ only), most valuable first: every
# candidate config of every op at small shapes, the paths no other test reaches, then the real shapes.
KERNEL_TEST_FILES = ("tests/test_gpu_configs.py", "tests/test_gpu_paths.py", "tests/test_attention.py",
                     "tests/test_varlen_attention.py", "tests/test_int6.py", "tests/test_embedding.py",
                     "tests/test_cross_entropy.py", "tests/test_mlp.py", "tests/test_gptq.py")
# tests/test_gpu_paths.py's compiled whole model: compile-heavy, so it runs with the model tests.
COMPILED_MODEL_TEST = "compiled_whole_model"
KERNEL_BENCH_ORDER = ("attention", "int6", "embedding", "cross_entropy", "mlp", "gptq")
STEP_BENCH = "step_time"
PYTEST = ("-q", "-p", "no:cacheprovider", "--continue-on-collection-errors")
KERNEL_TEST_RUN_S = 40.0     # running (not compiling) the kernel tests' ~150 small cases: no GPU timing yet
INTERRUPT_GRACE_S = 20.0      # after SIGINT, before SIGKILL: pytest writes its JSON / junit meanwhile
RESULTS_RESERVE_S = 10.0      # kept back for the results stage and the summary
BENCH_FINISH_S = 20.0         # a benchmark stage's deadline is this long before its cap (session finish, JSON)
LOG_NAME = "gpu_check.log"
FAILED, CUT, OK, SKIPPED, LISTED = "FAILED", "CUT SHORT", "ok", "skipped", "listed"


@dataclass
class Stage:
    """One stage: its estimate and the least time worth starting it with (seconds), whether it takes what
    is left (elastic), its command, and its outcome."""
    name: str
    estimate_s: float
    min_s: float
    command: list[str] = field(default_factory=list)
    elastic: bool = False
    basis: str = ""
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


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------

def required_packages() -> list[str]:
    """The distributions pyproject.toml names: the dependencies and the test and bench extras, without the
    linter (CI's only)."""
    text = (REPO / "pyproject.toml").read_text()
    names = []
    for block in re.findall(r"^(?:dependencies|test|bench)\s*=\s*\[(.*?)\]", text, flags=re.S | re.M):
        names += [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in re.findall(r'"([^"]+)"', block)]
    return [n for n in dict.fromkeys(names) if n != "ruff"]


def missing_packages() -> list[str]:
    """The required distributions this Python cannot find (installed or on its path)."""
    missing = []
    for name in required_packages():
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def environment_facts(commit: str) -> tuple[list[str], bool]:
    """Lines describing the machine and software, and whether a CUDA device is usable."""
    import torch
    import triton
    lines = [f"commit: {commit}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"torch: {torch.__version__} (CUDA runtime {torch.version.cuda})", f"triton: {triton.__version__}",
             f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
             f"triton cache: {os.environ.get('TRITON_CACHE_DIR', Path.home() / '.triton' / 'cache')}"]
    missing = missing_packages()
    if missing:
        wheels = " ".join(missing)
        lines += [f"MISSING packages: {', '.join(missing)} (what needs them fails or skips, saying so)",
                  f"  prepare their wheels on a machine with network: make gpu-wheels GPU_WHEELS=\"{wheels}\" "
                  f"(Python 3.12, manylinux x86_64, into .whl/), then carry .whl with the device call "
                  f"(docs/benchmarks.md)"]
    else:
        lines.append("packages: every one pyproject.toml names is installed")
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
        lines.append("GPU: no CUDA device: the build check skips, every GPU test and benchmark skips")
    return lines, cuda


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

def compile_record(path: Path = COMPILE_SECONDS) -> dict:
    """bench/compile_seconds.json: the build check's measured single-core compile seconds (per kernel and in
    total) and its wall time with its job count."""
    return json.loads(path.read_text())


def bench_marks(name: str, test: str) -> tuple[float, int | None]:
    """(cost_s marker, number of cases) of test function `test` in bench/test_<name>.py, read, not imported:
    the cases counted when its parametrize values are a list literal or list(NAME) of a module-level dict or
    list literal (else None)."""
    tree = ast.parse((REPO / "bench" / f"test_{name}.py").read_text())
    literals = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name) and isinstance(n.value, (ast.Dict, ast.List))}
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == test)
    marks = {d.func.attr: d.args for d in fn.decorator_list if isinstance(d, ast.Call)
             and isinstance(d.func, ast.Attribute)}
    values = marks["parametrize"][1]
    if isinstance(values, ast.Call) and isinstance(values.args[0], ast.Name):
        values = literals[values.args[0].id]
    cases = len(values.keys) if isinstance(values, ast.Dict) else len(values.elts) if isinstance(
        values, ast.List) else None
    return float(ast.literal_eval(marks["cost_s"][0])), cases


def estimates(record: dict, jobs: int) -> dict[str, tuple[float, float, str]]:
    """stage name -> (estimate s, minimum s, basis) from the compile record.

    A process start-up (python, torch, triton, the plan): the recorded build check's start-up in CPU seconds
    (its wall time on a shared machine grows with the machine's load; its CPU time does not). The build
    check: its compile seconds and the seconds it spends reading what it compiled, spread over `jobs`
    processes. The kernel tests: every candidate compiled once
    in one process (the upper bound: with the build check's cache they mostly load) plus KERNEL_TEST_RUN_S.
    The step benchmark: its cases times its cost_s marker (the compiled model's Inductor time, not in the
    record), and all of it at least (its speed-up needs both cases). The elastic stages' minimums: the
    kernel benchmarks' attention headline pair (the largest cost_s of any kernel case), the model tests' one
    start-up plus one compiled model."""
    total = record["total_compile_s"]
    startup = record["startup_s"]
    build = (total + record["total_inspect_s"]) / jobs + startup
    kernel_tests = total + startup + KERNEL_TEST_RUN_S
    step, step_cases = bench_marks(STEP_BENCH, "test_step")
    attention_cost, _ = bench_marks("attention", "test_dense")
    return {
        "build check": (build, build / 2, f"{total:.0f} s of compiles + {record['total_inspect_s']:.0f} s reading "
                        f"them / {jobs} jobs + {startup:.0f} s start-up"),
        "kernel tests": (kernel_tests, startup + 10, f"{total:.0f} s of compiles (uncached) + {startup:.0f} s "
                         f"start-up + {KERNEL_TEST_RUN_S:.0f} s running"),
        "kernel benchmarks": (0.0, 2 * attention_cost, "what is left; headline cases first"),
        "step benchmark": (step * step_cases, step * step_cases, f"{step_cases} cases x cost_s {step:.0f} s"),
        "model tests": (0.0, startup + step, "what is left"),
    }


def bench_files(names) -> list[str]:
    return [f"bench/test_{n}.py" for n in names]


def kernel_bench_names() -> list[str]:
    """Every benchmark but the step's: KERNEL_BENCH_ORDER, then any the order does not name yet."""
    names = [n for n in results.listed_benchmarks() if n != STEP_BENCH]
    return [n for n in KERNEL_BENCH_ORDER if n in names] + [n for n in names if n not in KERNEL_BENCH_ORDER]


def plan(out: Path, scratch: Path, jobs: int, record: dict) -> list[Stage]:
    """The stages in order, with their commands and sizes (the benchmark deadlines are added at their start)."""
    py = sys.executable
    est = estimates(record, jobs)

    def stage(name, command, elastic=False):
        e, m, basis = est[name]
        return Stage(name, e, m, command, elastic, basis)

    kernel_tests = [py, "-m", "pytest", "-m", "gpu", *KERNEL_TEST_FILES, "-k", f"not {COMPILED_MODEL_TEST}",
                    *PYTEST, f"--junitxml={scratch / 'kernel_tests.xml'}"]
    model_tests = [py, "-m", "pytest", "-m", "gpu", "tests",
                   *(f"--ignore={f}" for f in KERNEL_TEST_FILES if f != "tests/test_gpu_paths.py"),
                   "-k", f"not test_gpu_paths or {COMPILED_MODEL_TEST}",
                   *PYTEST, f"--junitxml={scratch / 'model_tests.xml'}"]
    bench_common = [*PYTEST, "--benchmark-columns=median,iqr,rounds"]
    return [
        Stage("environment", 0.0, 0.0),
        stage("build check", [py, "-m", "kernels.build_check", "--all", "--jobs", str(jobs),
                              "--json", str(out / "build_check.json")]),
        stage("kernel tests", kernel_tests),
        stage("kernel benchmarks", [py, "-m", "pytest", *bench_files(kernel_bench_names()), *bench_common,
                                    f"--benchmark-json={out / 'bench.json'}", f"--bench-out={out}",
                                    "--bench-headline-first"], elastic=True),
        stage("step benchmark", [py, "-m", "pytest", *bench_files([STEP_BENCH]), *bench_common,
                                 f"--benchmark-json={scratch / 'bench_step.json'}", f"--bench-out={scratch}"]),
        stage("model tests", model_tests, elastic=True),
        Stage("results", 0.0, 0.0),
    ]


def cap(stages: list[Stage], stage: Stage, left: float) -> float:
    """Seconds `stage` may take when `left` seconds of the budget remain (RESULTS_RESERVE_S kept back): its
    estimate; an elastic stage, what the later stages' estimates leave (at least its minimum). Later stages
    are less valuable: they get what is left, and skip when that is below their minimum."""
    room = left - RESULTS_RESERVE_S
    if not stage.elastic:
        return min(stage.estimate_s, room)
    later = stages[stages.index(stage) + 1:]
    return min(room, max(stage.min_s, room - sum(s.estimate_s for s in later if not s.elastic)))


# ----------------------------------------------------------------------------------------------
# Outputs: collection errors, merging the two test and two benchmark stages' files
# ----------------------------------------------------------------------------------------------

def collection_errors(junit: Path) -> list[str]:
    """The test modules pytest could not collect, from its junit XML (each a failure of the stage)."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return []
    return [case.get("name", "?") for case in root.iter("testcase")
            if any((e.get("message") or "").startswith("collection failure") for e in case.findall("error"))]


def merge_junit(parts: list[Path], target: Path) -> None:
    """One junit XML of every test suite in `parts` (those that exist); the parts are removed."""
    merged = ET.Element("testsuites")
    for part in parts:
        try:
            root = ET.parse(part).getroot()
        except (OSError, ET.ParseError):
            continue
        merged.extend(root.iter("testsuite"))
    if len(merged):
        report.write_atomic(target, lambda f: f.write(ET.tostring(merged, encoding="unicode")))


def merge_bench_json(main: Path, extra: Path) -> None:
    """Append the benchmarks of `extra` (when it exists) to `main` (created from it when missing)."""
    if not extra.exists():
        return
    data = json.loads(extra.read_text())
    if main.exists():
        first = json.loads(main.read_text())
        first["benchmarks"] += data["benchmarks"]
        data = first
    report.write_atomic(main, lambda f: json.dump(data, f, indent=1))


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", DEFAULT_BUDGET_S)),
                        help=f"total seconds (default $GPU_CHECK_BUDGET_S or {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--out", default=None,
                        help="output folder (default $GPU_CHECK_OUT, $OUT, runs/gpu-check-<time>)")
    parser.add_argument("--list-only", action="store_true", help="print the plan instead of running stages 2-6")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")

    clock = Clock(args.budget_s)
    out = out_dir(args.out)
    log = Log(out / LOG_NAME)
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))      # per-stage files merged into OUT at the end
    commit = harness.source_commit()
    env = child_env(commit)
    record = compile_record()
    stages = plan(out, scratch, os.cpu_count() or 1, record)
    env_stage, build, kernel_tests, kernel_bench, step_bench, model_tests, res = stages
    log(f"gpu-check: budget {args.budget_s:.0f} s, output {out}, {'LIST ONLY' if args.list_only else 'running'}")
    log(f"plan (estimates from {COMPILE_SECONDS.relative_to(REPO)}: {record['total_compile_s']:.0f} s single-core "
        f"compile time of {sum(k['compilations'] for k in record['kernels'].values())} compilations, triton "
        f"{record['triton']}, {record['date']}; caps as if each stage took its estimate):")
    left = args.budget_s
    for s in stages[1:-1]:
        c = cap(stages, s, left)
        log(f"  {s.name:<18} estimate {s.estimate_s:5.0f} s  cap {c:5.0f} s  min {s.min_s:4.0f} s  ({s.basis})"
            + ("" if c >= s.min_s else "  -> skipped at this budget"))
        left -= c if c >= s.min_s else 0
    log(f"  {'results':<18} reserve  {RESULTS_RESERVE_S:5.0f} s")

    def begin(stage: Stage) -> None:
        log("")
        log(f"=== [{stages.index(stage) + 1}/{len(stages)}] {stage.name} (t = {clock.elapsed():.0f} s) ===")

    def run_stage(stage: Stage, *, deadline: bool = False) -> int | None:
        begin(stage)
        timeout_s = cap(stages, stage, clock.left())
        cmd = stage.command + ([f"--bench-deadline={time.time() + timeout_s - BENCH_FINISH_S:.0f}"] if deadline else [])
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

    def run_tests(stage: Stage, junit: Path) -> None:
        run_stage(stage)
        broken = collection_errors(junit)
        if broken:
            stage.status = FAILED
            stage.note += f"; {len(broken)} module(s) failed to collect: {', '.join(broken)}"

    # 1. environment
    begin(env_stage)
    start = time.monotonic()
    facts, cuda = environment_facts(commit)
    for line in facts:
        log(line)
    env_stage.status, env_stage.seconds = OK, time.monotonic() - start

    # 2. build check: fills the Triton cache for this GPU
    if not cuda and not args.list_only:
        begin(build)
        build.status, build.note = SKIPPED, ("no CUDA device: the Triton cache is filled on the GPU machine only "
                                             "(`python -m kernels.build_check` is the offline sm_90 check)")
        log(f"skipped: {build.note}")
    else:
        run_stage(build)

    # 3-6
    run_tests(kernel_tests, scratch / "kernel_tests.xml")
    env["BENCH_COMMAND"] = f"make gpu-check (benchmark stages: pytest bench/test_*.py, {STEP_BENCH} last)"
    run_stage(kernel_bench, deadline=True)
    run_stage(step_bench, deadline=True)
    run_tests(model_tests, scratch / "model_tests.xml")

    # 7. results: one junit, one benchmark JSON, and the CSV, plots and RESULTS.md from it
    begin(res)
    merge_junit([scratch / "kernel_tests.xml", scratch / "model_tests.xml"], out / "gpu_tests.xml")
    bench_json = out / "bench.json"
    records = []
    try:
        merge_bench_json(bench_json, scratch / "bench_step.json")
        if bench_json.exists():
            records, _ = results.load_json(bench_json)
            report.write_csv(records, out / "bench.csv")
            log(harness.plot_if_possible(records, out / "bench_plots.png"))
        else:
            log("no bench.json (no benchmark ran): every GPU row says not measured")
        n = results.write_results(bench_json if bench_json.exists() else None, results.RESULTS_MD,
                                  out / "RESULTS.md", command=env["BENCH_COMMAND"])
        res.status, res.note = OK, f"{n} measured cases -> {out / 'RESULTS.md'}"
    except (results.ResultsError, ValueError, KeyError) as e:
        res.status, res.note = FAILED, str(e)
    log(res.note)

    # summary: last, so the tail of the output holds it
    log("")
    log(f"=== summary ({clock.elapsed():.0f} s of a {args.budget_s:.0f} s budget) ===")
    for s in stages:
        log(f"{s.name:<18} {s.status:<10} {s.seconds:7.1f} s  {s.note}")
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
