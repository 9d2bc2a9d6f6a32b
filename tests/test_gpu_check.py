"""The `make gpu-check` driver (bench/gpu_check.py) and the benchmark harness on a CPU: the stages it
reports, the files it writes, its time caps; `pytest bench` skipping cleanly and, in a smoke rehearsal,
writing the JSON / CSV the results stage reads."""
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


def stage_lines(log: str) -> dict[str, str]:
    """stage name -> its summary line."""
    summary = log.split("=== summary")[1]
    return {line.split("  ")[0].strip(): line for line in summary.splitlines()[1:]
            if line[:12].strip() in ("environment", "build check", "GPU tests", "benchmarks", "results")}


def test_list_only_dry_run_reports_every_stage_and_writes_the_ledger(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--list-only", "--budget-s", "60", "--out", str(out)]) == 0
    log = (out / "gpu_check.log").read_text()
    for i, name in enumerate(["environment", "build check", "GPU tests", "benchmarks", "results"], 1):
        assert f"=== [{i}/5] {name}" in log
    assert "commit: abc1234" in log and "budget 60 s" in log
    assert f"-m pytest -m gpu tests -q -p no:cacheprovider --junitxml={out / 'gpu_tests.xml'}" in log
    bench_cmd = next(line for line in log.splitlines() if line.startswith("$ ") and " bench/test_" in line)
    files = [w for w in bench_cmd.split() if w.startswith("bench/test_")]
    assert files[:2] == ["bench/test_step_time.py", "bench/test_attention.py"]      # most important first
    assert sorted(files) == sorted(f"bench/test_{n}.py" for n in results.listed_benchmarks())
    assert f"--benchmark-json={out / 'bench.json'}" in bench_cmd and "--bench-deadline=" in bench_cmd
    if (REPO / "kernels" / "build_check.py").exists():
        assert "-m kernels.build_check --all --jobs" in log and f"--json {out / 'build_check.json'}" in log
    else:
        assert "kernels/build_check.py does not exist" in log
    stages = stage_lines(log)
    assert "listed" in stages["GPU tests"] and "listed" in stages["benchmarks"]
    assert "0 measured cases" in stages["results"]
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "gpu_check.log"]
    ledger = (out / "RESULTS.md").read_text()
    assert ledger.partition(results.BEGIN)[0] == results.RESULTS_MD.read_text().partition(results.BEGIN)[0]
    assert "not measured" in ledger


def test_a_spent_budget_skips_the_stages_but_still_writes_results(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--budget-s", "5", "--out", str(out)]) == 3     # nothing failed, time ran out
    stages = stage_lines((out / "gpu_check.log").read_text())
    assert "skipped" in stages["GPU tests"] and "time budget" in stages["GPU tests"]
    assert "skipped" in stages["benchmarks"] and "time budget" in stages["benchmarks"]
    assert "ok" in stages["results"] and (out / "RESULTS.md").exists()


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
