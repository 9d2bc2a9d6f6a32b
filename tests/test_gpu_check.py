"""The `make gpu-check` driver (bench/gpu_check.py) and the benchmark harness on a CPU: the stages it
reports, the files it writes, its time caps; `pytest bench` skipping cleanly and, in a smoke rehearsal,
writing the JSON / CSV the results stage reads."""
import ast
import os
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_check, results

REPO = gpu_check.REPO


@pytest.fixture(autouse=True)
def no_device_tool_env(monkeypatch):
    """Tests choose the output folder and commit themselves (the device tool sets OUT)."""
    for name in ("OUT", "GPU_CHECK_OUT", "GPU_CHECK_BUDGET_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")


STAGES = ["environment", "build check", "kernel tests", "kernel benchmarks", "step benchmark", "model tests",
          "results"]


def stage_lines(log: str) -> dict[str, str]:
    """stage name -> its summary line."""
    summary = log.split("=== summary")[1]
    return {line[:18].strip(): line for line in summary.splitlines()[1:] if line[:18].strip() in STAGES}


def test_list_only_prints_the_plan_in_order_of_value_and_writes_the_ledger(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--list-only", "--budget-s", "420", "--out", str(out)]) == 0
    log = (out / "gpu_check.log").read_text()
    for i, name in enumerate(STAGES, 1):
        assert f"=== [{i}/7] {name}" in log
    assert "commit: abc1234" in log and "budget 420 s" in log
    # the plan: every stage with its estimate from the committed compile seconds, within the budget
    plan = log.split("plan (")[1].split("=== [1/7]")[0]
    rows = {line[:20].strip(): line for line in plan.splitlines()[1:] if "estimate" in line or "reserve" in line}
    assert list(rows) == STAGES[1:]
    caps = [float(line.split("cap")[1].split()[0]) for name, line in rows.items() if name != "results"]
    # (the caps are printed rounded to whole seconds: half a second each)
    assert sum(caps) + gpu_check.RESULTS_RESERVE_S <= 420 + len(caps) / 2 and caps[0] > 0 and caps[1] > 0
    record = gpu_check.compile_record()
    assert f"{record['total_compile_s']:.0f} s single-core compile time" in plan
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 5 and "-m kernels.build_check --all --jobs" in commands[0]
    kernel_tests = commands[1].split()
    assert kernel_tests.index("tests/test_gpu_configs.py") < kernel_tests.index("tests/test_gpu_paths.py")
    assert all(f in kernel_tests for f in gpu_check.KERNEL_TEST_FILES)
    assert "--continue-on-collection-errors" in commands[1] and "--continue-on-collection-errors" in commands[4]
    benches = [w for w in commands[2].split() if w.startswith("bench/test_")]
    assert benches[0] == "bench/test_attention.py" and "--bench-headline-first" in commands[2]
    assert sorted(benches + ["bench/test_step_time.py"]) == sorted(f"bench/test_{n}.py"
                                                                   for n in results.listed_benchmarks())
    assert "bench/test_step_time.py" in commands[3] and "-m gpu tests" in commands[4]
    stages = stage_lines(log)
    assert all("listed" in stages[name] for name in STAGES[1:-1])
    assert "0 measured cases" in stages["results"]
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "gpu_check.log"]
    ledger = (out / "RESULTS.md").read_text()
    assert ledger.partition(results.BEGIN)[0] == results.RESULTS_MD.read_text().partition(results.BEGIN)[0]
    assert "not measured" in ledger


def test_a_spent_budget_skips_the_stages_but_still_writes_results(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--budget-s", "5", "--out", str(out)]) == 3     # nothing failed, time ran out
    stages = stage_lines((out / "gpu_check.log").read_text())
    for name in ("kernel tests", "kernel benchmarks", "step benchmark", "model tests"):
        assert "skipped" in stages[name] and "time budget" in stages[name], stages[name]
    assert "ok" in stages["results"] and (out / "RESULTS.md").exists()


def test_caps_put_value_first():
    stages = [gpu_check.Stage("a", 50, 10), gpu_check.Stage("bench", 0, 30, elastic=True),
              gpu_check.Stage("step", 100, 100), gpu_check.Stage("rest", 0, 40, elastic=True)]
    reserve = gpu_check.RESULTS_RESERVE_S
    assert gpu_check.cap(stages, stages[0], 300) == 50                    # its estimate
    assert gpu_check.cap(stages, stages[0], 40) == 40 - reserve           # never more than is left
    assert gpu_check.cap(stages, stages[1], 250) == 250 - reserve - 100   # what the step's estimate leaves
    assert gpu_check.cap(stages, stages[1], 100) == 30                    # at least its minimum
    assert gpu_check.cap(stages, stages[3], 70) == 70 - reserve           # the last: everything left


def test_missing_packages_come_from_pyproject():
    names = gpu_check.required_packages()
    assert {"torch", "triton", "brotli", "pytest-benchmark", "matplotlib"} <= set(names) and "ruff" not in names
    assert gpu_check.missing_packages() == []          # CI installs them all


def test_collection_errors_are_read_from_the_junit_xml(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text('<testsuites><testsuite name="pytest"><testcase classname="" name="tests.test_x">'
                     '<error message="collection failure">ImportError</error></testcase>'
                     '<testcase classname="tests.test_y" name="test_ok"/></testsuite></testsuites>')
    assert gpu_check.collection_errors(junit) == ["tests.test_x"]
    second = tmp_path / "u.xml"
    second.write_text('<testsuites><testsuite name="pytest"><testcase classname="a" name="b"/></testsuite>'
                      '</testsuites>')
    gpu_check.merge_junit([junit, second, tmp_path / "missing.xml"], tmp_path / "all.xml")
    assert (tmp_path / "all.xml").read_text().count("<testsuite ") == 2


# ----------------------------------------------------------------------------------------------
# Issue 23 part 1: the GPU machine has no brotli. Every kernel test module and every benchmark must still
# collect, the way gpu-check collects them.
# ----------------------------------------------------------------------------------------------

BLOCKER = """import sys
class _NoBrotli:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("brotli", "_brotli"):
            # a plain ImportError, the broader case: what a missing (ModuleNotFoundError) or broken brotli raises
            raise ImportError(f"brotli blocked as on the GPU machine ({name!r})", name=name)
sys.meta_path.insert(0, _NoBrotli())
"""
# Kernel test modules that import crawler/ at module level (crawler.model needs sentencepiece and tqdm): none;
# each imports it inside the tests that need the model.
KERNEL_MODULES_IMPORTING_CRAWLER: set[str] = set()


def test_gpu_tests_and_benchmarks_collect_without_brotli(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *gpu_check.PYTEST, "-rs",
                           "--bench-headline-first", "tests", "bench"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and " error" not in out.lower().split("short test summary")[-1], out[-4000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    # the blocker worked: the artifact modules skipped (conftest.brotli_or_skip_module), nothing of theirs collected
    assert "brotli blocked" in out and not any(i.startswith("tests/test_artifact.py::") for i in ids)
    for module in gpu_check.KERNEL_TEST_FILES:
        assert any(i.startswith(module + "::") for i in ids), f"{module}: nothing collected"
    bench_ids = [i for i in ids if i.startswith("bench/")]
    for name in results.listed_benchmarks():
        assert any(i.startswith(f"bench/test_{name}.py::") for i in bench_ids), f"bench/test_{name}.py"
    from bench import conftest as bench_conftest
    headline = bench_ids[:len(bench_conftest.HEADLINE_CASES)]
    assert sorted(map(bench_conftest.case_name, headline)) == sorted(bench_conftest.HEADLINE_CASES)


def test_kernel_test_modules_import_no_crawler_code_at_module_level():
    importing = set()
    for module in gpu_check.KERNEL_TEST_FILES:
        tree = ast.parse((REPO / module).read_text())
        names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
        if any(name == "crawler" or name.startswith(("crawler.", "trainer_fixtures")) for name in names):
            importing.add(module)
    assert importing == KERNEL_MODULES_IMPORTING_CRAWLER


def test_a_stage_past_its_cap_is_interrupted(tmp_path):
    log = gpu_check.Log(tmp_path / "log")
    start = time.monotonic()
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    code, cut = gpu_check.run_command(sleeper, timeout_s=2, env=dict(os.environ), log=log)
    log.close()
    assert cut and code != 0 and time.monotonic() - start < 30
    text = (tmp_path / "log").read_text()
    assert "started" in text and "time cap of 2 s reached" in text


def test_output_folder_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "device_out"))
    assert gpu_check.out_dir(None) == tmp_path / "device_out"
    monkeypatch.setenv("GPU_CHECK_OUT", str(tmp_path / "chosen"))
    assert gpu_check.out_dir(None) == tmp_path / "chosen"
    assert gpu_check.out_dir(str(tmp_path / "arg")) == tmp_path / "arg" and (tmp_path / "arg").is_dir()


def run_pytest_bench(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KERNELS_POISON_OUTPUTS")}
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmarks run for real")
def test_pytest_bench_skips_every_benchmark_without_cuda():
    proc = run_pytest_bench("bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "needs a CUDA device (none found): nothing measured" in proc.stdout
    assert " passed" not in proc.stdout and " skipped" in proc.stdout


def test_smoke_rehearsal_writes_what_the_results_stage_reads(tmp_path):
    case = "bench/test_int6.py::test_int6_linear[attn.c_k / attn.c_v-1-{}]"
    proc = run_pytest_bench(case.format("int6"), case.format("bf16"), "--bench-smoke", f"--bench-out={tmp_path}",
                            f"--benchmark-json={tmp_path / 'bench.json'}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SMOKE RUN on the CPU" in proc.stdout
    records, facts = results.load_json(tmp_path / "bench.json")
    assert sorted(r["role"] for r in records) == ["baseline", "ours"]
    assert all(r["smoke"] and r["median_ms"] > 0 and r["metrics"]["rel_err_int6_vs_bf16"] < 1e-2 for r in records)
    assert facts["commit"] == "abc1234" and "--bench-smoke" in facts["command"]
    assert (tmp_path / "bench.csv").read_text().count("attn.c_k") == 2
    assert (tmp_path / "bench_plots.png").exists()
    with pytest.raises(results.ResultsError, match="not GPU measurements"):
        results.check_measured(records)
