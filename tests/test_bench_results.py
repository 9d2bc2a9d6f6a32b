"""bench/RESULTS.md's GPU section from a pytest-benchmark JSON (bench/results.py) and the shared record
helpers (bench/report.py), on synthetic records: never measured numbers, never written into the ledger."""
import json
from pathlib import Path

import pytest

from bench import report, results
from bench.harness import Bench, Timing

DEVICE = "NVIDIA H200"


def record(benchmark, group, impl, role, median_ms, **metrics):
    """A record as bench/harness.py writes it into extra_info."""
    return dict(benchmark=benchmark, group=group, impl=impl, role=role, device=DEVICE, device_kind="cuda",
                smoke=False, torch="2.11.0+cu130", triton="3.6.0", rep_ms=100.0, median_ms=median_ms,
                q20_ms=median_ms * 0.9, q80_ms=median_ms * 1.1, metrics=metrics)


def benchmark_json(path: Path, records, *, commit="0123456789abcdef", command="make gpu-check") -> Path:
    """The parts of pytest-benchmark's JSON layout the generator reads."""
    data = {"machine_info": {"cuda_device": DEVICE}, "commit_info": {"id": commit}, "version": "5.1.0",
            "datetime": "2026-12-02T10:11:12+00:00", "command": command,
            "benchmarks": [{"name": f"test_{i}", "fullname": f"bench/test_x.py::test_{i}", "group": r["group"],
                            "extra_info": r, "stats": {"median": r["median_ms"] / 1e3}} for i, r in enumerate(records)]}
    path.write_text(json.dumps(data))
    return path


RECORDS = [
    record("attention", "dense D=46 XSA fwd", "ours (fused XSA)", "ours", 2.0, **{"TFLOP/s": 411.5}),
    record("attention", "dense D=46 XSA fwd", "SDPA flash + XSA (D padded to 48)", "baseline", 5.0),
    record("attention", "dense D=46 XSA fwd", "FlexAttention + XSA", "baseline", 3.0),
    record("gptq", "pr1579: all 30 block matrices", "torch reference, CPU (est.)", "baseline", 9000.0),
    record("step_time", "pr1579 micro-batch 32x2048 fwd+bwd", "ours (fused Triton ops), compiled", "ours", 100.0,
           MFU=0.41, profile_top=[["_attn_fwd_kernel", 12.5, 10], ["mm", 30.1, 80]]),
]


def test_speedups_are_baseline_over_ours_within_a_group():
    ratio = report.speedups(RECORDS)
    assert ratio[("attention", "dense D=46 XSA fwd", "SDPA flash + XSA (D padded to 48)")] == pytest.approx(2.5)
    assert ratio[("attention", "dense D=46 XSA fwd", "FlexAttention + XSA")] == pytest.approx(1.5)
    assert ratio[("attention", "dense D=46 XSA fwd", "ours (fused XSA)")] == pytest.approx(1.0)
    assert ratio[("gptq", "pr1579: all 30 block matrices", "torch reference, CPU (est.)")] is None   # no ours


def test_gpu_section_generated_from_json(tmp_path):
    ledger = tmp_path / "RESULTS.md"
    original = results.RESULTS_MD.read_text()
    ledger.write_text(original)
    out = tmp_path / "out.md"
    code = results.main(["--json", str(benchmark_json(tmp_path / "bench.json", RECORDS)), "--results", str(ledger),
                         "--out", str(out)])
    assert code == 0
    assert ledger.read_text() == original                      # --out leaves the input alone
    text = out.read_text()
    head, rest = text.split(results.BEGIN)
    section, tail = rest.split(results.END)
    # everything outside the markers (the CPU section) is kept as it was
    assert head == original.partition(results.BEGIN)[0]
    assert tail == original.partition(results.END)[2]
    assert f"Device: {DEVICE} (torch 2.11.0+cu130, triton 3.6.0); date 2026-12-02; commit `0123456789ab`" in section
    assert "command `make gpu-check`" in section
    assert "| dense D=46 XSA fwd | SDPA flash + XSA (D padded to 48) | 5 (4.5-5.5) | 2.50× |" in section
    assert "| dense D=46 XSA fwd | FlexAttention + XSA | 3 (2.7-3.3) | 1.50× |" in section
    assert "| dense D=46 XSA fwd | ours (fused XSA) | 2 (1.8-2.2) | (ours) | TFLOP/s 411.5 |" in section
    assert "| torch reference, CPU (est.) | 9000 (8100-9900) | – |" in section
    assert ("<summary>pr1579 micro-batch 32x2048 fwd+bwd, ours (fused Triton ops), compiled: profile_top</summary>"
            in section)
    assert "- ['_attn_fwd_kernel', 12.5, 10]" in section
    listed = results.listed_benchmarks()
    assert {"attention", "embedding", "int6", "gptq", "mlp", "cross_entropy", "step_time"} <= set(listed)
    for name in listed:
        expected = "not measured" if name not in ("attention", "gptq", "step_time") else "cases measured"
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert expected in row and f"`pytest bench/test_{name}.py`" in row


def test_no_run_means_every_row_not_measured(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert results.write_results(None, results.RESULTS_MD, out) == 0
    section = out.read_text().partition(results.BEGIN)[2].partition(results.END)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`pytest bench/" in line]
    assert len(rows) == len(results.listed_benchmarks()) and all("not measured" in r for r in rows)
    assert "### " not in section and "Device:" not in section       # no tables of numbers


def test_smoke_and_cpu_records_are_refused(tmp_path, capsys):
    smoke = dict(RECORDS[0], smoke=True, device_kind="cpu", device="CPU smoke run (x86_64, interpreter)")
    ledger = tmp_path / "RESULTS.md"
    ledger.write_text(results.RESULTS_MD.read_text())
    code = results.main(["--json", str(benchmark_json(tmp_path / "bench.json", [RECORDS[1], smoke])),
                         "--results", str(ledger)])
    assert code == 2
    assert "not GPU measurements" in capsys.readouterr().err
    assert ledger.read_text() == results.RESULTS_MD.read_text()


def test_bad_inputs_get_clear_errors(tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text('{"benchmarks": [')                          # truncated
    with pytest.raises(results.ResultsError, match="bench.json: not a readable JSON"):
        results.load_json(bad)
    with pytest.raises(results.ResultsError, match="no such benchmark JSON"):
        results.load_json(tmp_path / "missing.json")
    foreign = benchmark_json(tmp_path / "foreign.json", [])
    data = json.loads(foreign.read_text())
    data["benchmarks"] = [{"fullname": "x::y", "extra_info": {}}]
    foreign.write_text(json.dumps(data))
    with pytest.raises(results.ResultsError, match="has no benchmark, group"):
        results.load_json(foreign)
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# results\n")
    with pytest.raises(results.ResultsError, match="plain.md: expected one"):
        results.write_results(None, no_markers)


class FakeBenchmark:
    """The parts of pytest-benchmark's fixture that Bench.record uses."""
    fullname = "bench/test_int6.py::test_int6_linear[mlp.fc-1-int6]"

    def __init__(self):
        self.extra_info, self.group = {}, None


def test_harness_records_are_what_the_generator_reads(tmp_path):
    b = Bench(smoke=True, rep_ms=1.0)
    fake = FakeBenchmark()
    rec = b.record(fake, group="mlp.fc K=64 N=256 M=1", impl="ours", role="ours", timing=Timing(1.0, 2.0, 3.0),
                   metrics={"GB/s": 1.5})
    assert rec["benchmark"] == "int6" and fake.extra_info == rec
    loaded, _ = results.load_json(benchmark_json(tmp_path / "bench.json", [fake.extra_info]))
    assert loaded == [rec]
    with pytest.raises(results.ResultsError, match="not GPU measurements"):
        results.check_measured(loaded)                            # a smoke record never reaches RESULTS.md
    with pytest.raises(ValueError, match="role"):
        b.record(fake, group="g", impl="x", role="winner", timing=Timing(1, 1, 1), metrics={})


def test_csv_and_plot(tmp_path):
    report.write_csv(RECORDS, tmp_path / "bench.csv")
    lines = (tmp_path / "bench.csv").read_text().splitlines()
    assert lines[0].split(",")[:9] == list(report.COLUMNS) and "TFLOP/s" in lines[0] and "profile_top" not in lines[0]
    sdpa = next(line for line in lines if "SDPA flash" in line)
    assert ",2.5," in sdpa
    assert report.plot(RECORDS, tmp_path / "plots.png") and (tmp_path / "plots.png").stat().st_size > 0
    assert not report.plot(RECORDS[3:4], tmp_path / "none.png")          # nothing to compare: no file
    assert not (tmp_path / "none.png").exists()
