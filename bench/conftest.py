"""pytest configuration of the benchmarks (`pytest bench`, from the repository root).

Options (each also read from an environment variable, so `make bench ARGS=...` or the GPU check can
set them):
  --bench-rep-ms MS    do_bench measuring time per case (BENCH_REP_MS, default 100; sized from the
                       time left when only --bench-deadline is given)
  --bench-deadline T   Unix time after which no further benchmark starts (BENCH_DEADLINE); a test
                       marked `cost_s(N)` is skipped when fewer than N seconds are left
  --bench-out DIR      where bench.csv and bench_plots.png go (BENCH_OUT, default runs/bench, git-ignored)
  --bench-smoke        rehearse every benchmark on the CPU at tiny sizes under TRITON_INTERPRET=1, compiled
                       functions traced by Dynamo only (BENCH_SMOKE=1): checks the code paths, measures nothing
  --bench-headline-first  run each benchmark's HEADLINE_CASES before every other case (BENCH_HEADLINE_FIRST=1),
                       so a short budget measures every op once (the GPU check's order)
Without CUDA (and without --bench-smoke) every benchmark is skipped: "needs a CUDA device".
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from bench import harness, report

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_COST_S = 10.0        # a benchmark case's time when its test does not say (cost_s marker)
REP_SHARE = 0.3              # share of the time left that repetitions may take when sized from a deadline
# Each benchmark's most important case: ours and the baseline its headline speed-up is read against (the
# training pass at the pr1579 shape; int6 at decode, M = 1). tests/test_gpu_check.py checks each still names
# a collected case.
HEADLINE_CASES = (
    "test_attention.py::test_dense[46-fwd+bwd-ours]", "test_attention.py::test_dense[46-fwd+bwd-sdpa_flash]",
    "test_int6.py::test_int6_linear[attn.c_q / attn.proj-1-int6]",
    "test_int6.py::test_int6_linear[attn.c_q / attn.proj-1-bf16]",
    "test_embedding.py::test_embed[fwd+bwd-ours]", "test_embedding.py::test_embed[fwd+bwd-compiled]",
    "test_cross_entropy.py::test_cross_entropy[fwd+bwd-ours]",
    "test_cross_entropy.py::test_cross_entropy[fwd+bwd-compiled]",
    "test_mlp.py::test_mlp[relu2-fwd+bwd-ours]", "test_mlp.py::test_mlp[relu2-fwd+bwd-compiled]",
    "test_gptq.py::test_gptq[ours_batched]", "test_gptq.py::test_gptq[torch_gpu]",
    "test_step_time.py::test_step[ours]", "test_step_time.py::test_step[seed]",
)
_REP_MS = pytest.StashKey[float]()
_BENCH = pytest.StashKey[harness.Bench]()


def pytest_addoption(parser):
    group = parser.getgroup("bench", "crawler-kernels benchmarks")
    group.addoption("--bench-rep-ms", type=float, default=_env_float("BENCH_REP_MS"),
                    help=f"do_bench measuring time per case in ms (default {harness.DEFAULT_REP_MS:g})")
    group.addoption("--bench-deadline", type=float, default=_env_float("BENCH_DEADLINE"),
                    help="Unix time after which no benchmark starts (skipped, saying so)")
    group.addoption("--bench-out", default=os.environ.get("BENCH_OUT", str(harness.REPO / "runs" / "bench")),
                    help="folder for bench.csv and bench_plots.png")
    group.addoption("--bench-smoke", action="store_true", default=os.environ.get("BENCH_SMOKE") == "1",
                    help="CPU rehearsal at tiny sizes (interpreter, Dynamo tracing only): code paths only")
    group.addoption("--bench-headline-first", action="store_true",
                    default=os.environ.get("BENCH_HEADLINE_FIRST") == "1",
                    help="each benchmark's headline cases (HEADLINE_CASES) before every other case")


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def pytest_configure(config):
    config.addinivalue_line("markers", "cost_s(seconds): expected wall time of one case, for the deadline")
    if config.getoption("--bench-smoke", default=False):
        # Before any test module imports kernels (triton.jit reads it at decoration time).
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["BENCH_SMOKE"] = "1"       # harness.compiled: Dynamo tracing without Inductor


def _is_benchmark(item) -> bool:
    return BENCH_DIR in Path(str(item.path)).resolve().parents


def case_name(nodeid: str) -> str:
    """"test_x.py::test_y[params]" of a benchmark's node id (its folder dropped)."""
    path, _, rest = nodeid.partition("::")
    return f"{Path(path).name}::{rest}"


def is_headline(nodeid: str) -> bool:
    return case_name(nodeid) in HEADLINE_CASES


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-headline-first"):
        items.sort(key=lambda item: not (_is_benchmark(item) and is_headline(item.nodeid)))   # stable
    ours = [item for item in items if _is_benchmark(item)]
    smoke = config.getoption("--bench-smoke")
    if not smoke and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (none found): nothing measured")
        for item in ours:
            item.add_marker(skip)
        return
    for item in ours:   # pytest-benchmark's rounds read a clock that waits for the device first
        item.add_marker(pytest.mark.benchmark(timer=harness.synchronized_clock))
    rep_ms = config.getoption("--bench-rep-ms")
    deadline = config.getoption("--bench-deadline")
    if rep_ms is None and deadline is not None and ours:
        # About 2.25 rep_ms per case (do_bench warm-up + rep, then as long in pytest-benchmark rounds).
        rep_ms = REP_SHARE * (deadline - time.time()) * 1e3 / (2.25 * len(ours))
        rep_ms = min(harness.DEFAULT_REP_MS, max(10.0, rep_ms))
    config.stash[_REP_MS] = harness.DEFAULT_REP_MS if rep_ms is None else rep_ms


def pytest_runtest_setup(item):
    deadline = item.config.getoption("--bench-deadline")
    if deadline is None or not _is_benchmark(item):
        return
    marker = item.get_closest_marker("cost_s")
    cost = float(marker.args[0]) if marker else DEFAULT_COST_S
    left = deadline - time.time()
    if left < cost:
        pytest.skip(f"time budget: {max(left, 0):.0f} s left before the deadline, this case needs ~{cost:.0f} s")


@pytest.fixture(scope="session")
def bench(request) -> harness.Bench:
    """The session's Bench: device, dtype, sizes, repetition budget, records."""
    config = request.config
    b = harness.Bench(smoke=config.getoption("--bench-smoke"), rep_ms=config.stash[_REP_MS])
    config.stash[_BENCH] = b
    return b


@pytest.fixture(autouse=True)
def _save_records(request):
    """After every benchmark, rewrite bench.csv, so a run cut short still leaves what it measured."""
    yield
    b = request.config.stash.get(_BENCH, None)
    if b is not None and b.records:
        report.write_csv(b.records, Path(request.config.getoption("--bench-out")) / "bench.csv")


def pytest_sessionfinish(session):
    b = session.config.stash.get(_BENCH, None)
    if b is not None and b.records:
        out = Path(session.config.getoption("--bench-out"))
        report.write_csv(b.records, out / "bench.csv")
        print(harness.plot_if_possible(b.records, out / "bench_plots.png"))


def pytest_terminal_summary(terminalreporter, config):
    b = config.stash.get(_BENCH, None)
    if b is None or not b.records:
        return
    terminalreporter.section("benchmark records (median ms, do_bench; speed-up = baseline / ours, same run)")
    if b.smoke:
        terminalreporter.write_line("SMOKE RUN on the CPU: code paths only, these are not measurements")
    for line in report.text_table(b.records):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"wrote {Path(config.getoption('--bench-out')) / 'bench.csv'} (+ bench_plots.png)")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """The device and versions in the JSON's machine_info (pytest-benchmark records only the host)."""
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cuda_runtime"] = torch.version.cuda


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_commit_info(config, commit_info):
    """The measured commit even where the tree came without git metadata (BENCH_COMMIT)."""
    if os.environ.get("BENCH_COMMIT") or not commit_info.get("id"):
        commit_info["id"] = harness.source_commit()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """The command that produced the JSON, for the RESULTS.md rows."""
    output_json["command"] = os.environ.get("BENCH_COMMAND") or "pytest " + " ".join(config.invocation_params.args)
