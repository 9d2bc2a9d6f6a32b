"""kernels.build_check, the offline Hopper build check: no CUDA, no network. It runs in a process without
TRITON_INTERPRET (conftest sets it for this one, and the interpreter's single configs are not what a GPU
compiles). In `make test` the subset compiles one config of every kernel at the pr1579 shapes for sm_90
and must come out clean; the whole check (every config, every workload) runs with BUILD_CHECK_ALL=1."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import build_check

REPO = Path(__file__).resolve().parents[1]
KERNELS = {"_embed_fwd_kernel", "_embed_bwd_rows_kernel", "_segment_sum_kernel", "_proj_grad_kernel", "_attn_fwd",
           "_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_mlp_up_kernel", "_mlp_dpre_kernel",
           "_ce_forward_kernel", "_ce_dlogits_kernel", "_int6_decode_kernel", "_splitk_reduce_kernel",
           "_int6_gemm_kernel", "_gptq_block_kernel"}
# The matmul kernels whose bf16 tl.dot must become Hopper warpgroup MMA at the pr1579 shapes.
HGMMA_KERNELS = {"_embed_fwd_kernel", "_embed_bwd_rows_kernel", "_proj_grad_kernel", "_attn_fwd", "_attn_bwd_dkdv",
                 "_attn_bwd_dq", "_mlp_up_kernel", "_mlp_dpre_kernel", "_ce_forward_kernel", "_ce_dlogits_kernel",
                 "_int6_gemm_kernel"}


def run_build_check(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.build_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if "build_check: SKIPPED" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    return proc


def check_rows(rows):
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['spec']}"
        assert r["status"] == "ok" and r["problems"] == [], (where, r["status"], r["problems"])
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] == 0 and r["spill_instructions"] == 0, where
        assert 0 <= r["smem_bytes"] <= build_check.SM90["smem_per_block"] and r["blocks_per_sm"] >= 1, where
        assert r["compile_s"] > 0, where
        if r["bf16_dot"]:
            assert any("BF16" in m for m in r["mma"]), (where, r["mma"])
        if r["kernel"] in HGMMA_KERNELS:
            assert r["bf16_dot"] and any(m.startswith("HGMMA") and m.endswith("BF16") for m in r["mma"]), where


def test_subset_compiles_every_kernel_for_sm90_without_a_gpu(tmp_path):
    out = tmp_path / "build_check.json"
    proc = run_build_check("--subset", "--jobs", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["kernel"] for r in rows} == KERNELS and len(rows) == len(KERNELS)
    check_rows(rows)
    summary = result["summary"]
    assert summary["compilations"] == len(rows) and summary["with_problems"] == 0
    assert summary["first_training_step"]["compilations"] == sum(build_check.FIRST_STEP in r["workloads"]
                                                                 for r in rows)
    assert result["environment"]["target"].startswith("sm_90")
    assert "first pr1579 training step" in proc.stdout and "_attn_fwd" in proc.stdout


def test_listing_derives_the_launches_from_the_launchers(tmp_path):
    out = tmp_path / "plan.json"
    proc = run_build_check("--list", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    fwd = [r for r in rows if r["kernel"] == "_attn_fwd" and "VARLEN=0" in r["spec"]]
    # XSA is an autotune key: both variants are compilations of their own, each with the whole list.
    with_xsa = [r for r in fwd if "XSA=1" in r["spec"]]
    assert with_xsa and len(with_xsa) == len(fwd) - len(with_xsa)
    p = build_check.PR1579
    for r in fwd:     # grid (query blocks, batch · heads) of the first workload that launches it (B = 32)
        block_m = int(r["config"].split("BLOCK_M=")[1].split()[0])
        assert r["programs"] == math.ceil(p["T"] / block_m) * 32 * p["H"], r
    varlen = [r for r in rows if r["kernel"] == "_attn_fwd" and "VARLEN=1" in r["spec"]]
    assert varlen and {r["config"] for r in varlen} != {r["config"] for r in fwd}   # its own (pruned) list
    for r in varlen:  # grid (query blocks of max_seqlen = T, capacity segments · heads), capacity 8·B
        block_m = int(r["config"].split("BLOCK_M=")[1].split()[0])
        assert r["programs"] == math.ceil(p["T"] / block_m) * 8 * 32 * p["H"], r
    ce = [r for r in rows if r["kernel"] == "_ce_forward_kernel"]
    for r in ce:      # 65,536 tokens fill the GPU by themselves: one vocabulary split
        block_n = int(r["config"].split("BLOCK_N=")[1].split()[0])
        assert r["programs"] == 32 * p["T"] // block_n, r
    first = {r["kernel"] for r in rows if build_check.FIRST_STEP in r["workloads"]}
    assert first == KERNELS - {"_int6_decode_kernel", "_splitk_reduce_kernel", "_int6_gemm_kernel",
                               "_gptq_block_kernel"}


def test_problems_and_occupancy():
    ok = {"status": "ok", "spill_bytes": 0, "spill_instructions": 0, "smem_bytes": 1024, "bf16_dot": True,
          "mma": {"HGMMA.64x64x16.F32.BF16": 4}}
    assert build_check._problems(ok) == []
    assert build_check._problems({**ok, "spill_bytes": 8})[0].startswith("spills")
    assert "shared memory" in build_check._problems({**ok, "smem_bytes": 240 * 1024})[0]
    assert build_check._problems({**ok, "mma": {"HMMA.16816.F32.F16": 2}}) == ["bf16 tl.dot without bf16 "
                                                                               "tensor-core MMA"]
    assert build_check._problems({**ok, "status": "compile failed: X"}) == ["compile failed: X"]
    # 128 registers x 4 warps: 16 warps' worth of registers per SM -> 4 blocks; 255 x 8 warps -> 1 block
    assert build_check._occupancy(128, 0, 4) == 4
    assert build_check._occupancy(255, 0, 8) == 1
    assert build_check._occupancy(64, 100 * 1024, 4) == 2          # shared memory binds first


def test_refuses_to_plan_under_the_interpreter():
    with pytest.raises(SystemExit, match="unset TRITON_INTERPRET"):
        build_check.build_plan()


@pytest.mark.skipif(os.environ.get("BUILD_CHECK_ALL") != "1",
                    reason="the whole build check takes minutes on 2 cores: set BUILD_CHECK_ALL=1")
def test_whole_check(tmp_path):
    out = tmp_path / "build_check.json"
    proc = run_build_check("--all", "--json", str(out), timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check_rows(json.loads(out.read_text())["rows"])
