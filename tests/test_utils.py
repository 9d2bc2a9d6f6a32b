"""The kernels' launch policy (kernels/utils.py): one device check for every Triton op, references that
reject what their ops reject, the tl.dot rule, config selection, tile helpers, persisted tuning."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton.language as tl

import kernels
from kernels import mlp, reference, utils

REPO = Path(__file__).resolve().parents[1]


def test_every_op_gives_one_clear_error_on_plain_cpu_tensors():
    # conftest sets TRITON_INTERPRET=1 for this process; the check is about a process without it.
    script = textwrap.dedent("""
        import json, torch, kernels
        from kernels import pack_int6
        q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
        ids, tok, table, proj, gate = torch.tensor([[1, 2]]), torch.randn(5, 8), torch.randn(7, 4), \\
            torch.randn(8, 4), torch.randn(8)
        w, hess = torch.randn(4, 8), torch.eye(8)
        calls = {
            "attention": lambda: kernels.attention(q, kv, kv),
            "embed": lambda: kernels.embed(ids, tok, table, proj, gate),
            "relu2_mlp": lambda: kernels.relu2_mlp(torch.randn(3, 8), torch.randn(16, 8), torch.randn(8, 16)),
            "softcapped_cross_entropy": lambda: kernels.softcapped_cross_entropy(
                torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 4]), 30.0),
            "int6_linear": lambda: kernels.int6_linear(torch.randn(2, 8), pack_int6(torch.zeros(4, 8,
                                                       dtype=torch.int8)), torch.ones(4, dtype=torch.float16)),
            "gptq_quantize": lambda: kernels.gptq_quantize(w, hess),
            "gptq_quantize_batched": lambda: kernels.gptq_quantize_batched(w[None], hess[None]),
        }
        out = {}
        for name, call in calls.items():
            try:
                call()
                out[name] = None
            except Exception as e:
                out[name] = [type(e).__name__, str(e)]
        print(json.dumps(out))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    first_arg = {"attention": "q", "embed": "ids", "relu2_mlp": "h", "softcapped_cross_entropy": "hidden",
                 "int6_linear": "x", "gptq_quantize": "weight", "gptq_quantize_batched": "weights"}
    for op, arg in first_arg.items():
        assert errors[op] is not None, f"{op} accepted plain CPU tensors"
        kind, message = errors[op]
        assert kind == "ValueError", (op, kind, message)
        assert message.startswith(f"{op}: {arg} is on cpu; the Triton ops need a CUDA tensor (or "
                                  f"TRITON_INTERPRET=1 for the CPU interpreter); use kernels.reference."), message


def test_device_check_passes_cuda_and_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    utils.check_triton_device("relu2_mlp", "h", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"relu2_mlp: h is on cpu.*use kernels\.reference\.relu2_mlp on CPU"):
        utils.check_triton_device("relu2_mlp", "h", torch.zeros(1))
    with pytest.raises(ValueError, match=r"use my.fallback on CPU"):
        utils.check_triton_device("op", "x", torch.zeros(1), reference="my.fallback")


def _mlp_args():
    return torch.randn(3, 8), torch.randn(16, 8), torch.randn(8, 16), 0.0


def _ce_args():
    return torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 4]), 30.0


BAD = [  # (op, bad arguments, exception, message): both the op and its reference must raise it
    ("relu2_mlp", lambda h, fc, pj, s: (h.int(), fc, pj, s), TypeError, "h: expected dtype"),
    ("relu2_mlp", lambda h, fc, pj, s: (h[0, 0], fc, pj, s), ValueError, "h: expected a tensor of shape"),
    ("relu2_mlp", lambda h, fc, pj, s: (h, fc[:, :-1], pj, s), ValueError, r"fc_weight: expected shape \(hidden, 8\)"),
    ("relu2_mlp", lambda h, fc, pj, s: (h, fc, pj.T, s), ValueError, r"proj_weight: expected shape \(8, 16\)"),
    ("relu2_mlp", lambda h, fc, pj, s: (h, fc.to("meta"), pj, s), ValueError, "fc_weight: expected a tensor on cpu"),
    ("relu2_mlp", lambda h, fc, pj, s: (h, fc, pj, float("nan")), ValueError, "negative_slope: expected a finite"),
    ("relu2_mlp", lambda h, fc, pj, s: (h, fc, pj, True), ValueError, "negative_slope: expected a finite"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w, t + 5, c), ValueError,
     r"targets: expected class indices in \[0, 5\)"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w, t.float(), c), TypeError, "targets: expected dtype"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w, t[:-1], c), ValueError, r"targets: expected shape \(3,\)"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h[None], w, t, c), ValueError, "hidden: expected a 2-D"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w[:, :-1], t, c), ValueError,
     r"weight: expected shape \(V, 8\)"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h[:0], w, t[:0], c), ValueError, "hidden: expected at least one"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w, t, 0.0), ValueError, "softcap: expected a finite"),
    ("softcapped_cross_entropy", lambda h, w, t, c: (h, w.to("meta"), t, c), ValueError,
     "weight: expected a tensor on cpu"),
]


@pytest.mark.parametrize("op,bad,exc,match", BAD, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("impl", ["kernels", "reference"])
def test_references_reject_what_the_ops_reject(impl, op, bad, exc, match):
    args = (_mlp_args if op == "relu2_mlp" else _ce_args)()
    fn = getattr(kernels if impl == "kernels" else reference, op)
    with pytest.raises(exc, match=match):
        fn(*bad(*args))


def test_dot_args_is_one_rule(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert utils.dot_args(dtype) == {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert utils.dot_args(torch.bfloat16)["DOT_DTYPE"] == tl.bfloat16
    assert utils.dot_args(torch.float16)["DOT_DTYPE"] == tl.float16
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert utils.dot_args(torch.float32) == {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
        assert utils.dot_args(torch.float64) == {"DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
        torch.set_float32_matmul_precision("high")
        assert utils.dot_args(torch.float32) == {"DOT_DTYPE": tl.float32, "PRECISION": "tf32"}
    finally:
        torch.set_float32_matmul_precision(previous)


def test_config_selection(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert utils.autotune_configs(["a", "b"], "i") == ["a", "b"]
    assert utils.gpu_or_interpreter(64, 16) == 64
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert utils.autotune_configs(["a", "b"], "i") == ["i"]
    assert utils.gpu_or_interpreter(64, 16) == 16
    # this process imported kernels under the interpreter: each autotuned kernel has its single config
    assert len(mlp._mlp_up_kernel.configs) == 1


def test_autotune_asks_triton_to_keep_its_timings(monkeypatch):
    # (Triton itself turns cache_results off under the interpreter, so the request is what is checked.)
    seen = {}
    monkeypatch.setattr(utils.triton, "autotune", lambda **kwargs: seen.update(kwargs))
    utils.autotune(["config"], key=["N"])
    assert seen == {"configs": ["config"], "key": ["N"], "cache_results": True}


def test_tile_helpers_and_token_bucket():
    assert [utils.pow2_tile(n) for n in (1, 16, 17, 46, 128)] == [16, 16, 32, 64, 128]
    assert utils.pow2_tile(5, minimum=1) == 8
    assert [utils.pow2_divisor(v) for v in (0, 1, 184, 736, 2944 // 4, 96)] == [16, 1, 8, 16, 16, 16]
    assert [utils.token_bucket(n) for n in (0, 1, 3, 8192, 8193, 65536)] == [1, 1, 4, 8192, 16384, 65536]


def test_planned_multiprocessors_only_for_meta_tensors():
    meta, cpu = torch.device("meta"), torch.device("cpu")
    with utils.planning_for(132):
        assert utils.multiprocessor_count(meta) == 132
        assert utils.multiprocessor_count(cpu) == utils.INTERPRETER_MULTIPROCESSORS
    assert utils.multiprocessor_count(meta) == utils.INTERPRETER_MULTIPROCESSORS


def test_class_index_check_skips_what_has_no_values():
    utils.check_class_indices(torch.empty(4, dtype=torch.int64, device="meta"), 3)
    with pytest.raises(ValueError, match=r"got values in \[0, 7\]"):
        utils.check_class_indices(torch.tensor([0, 7]), 3)


def test_persistent_choices_time_once_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    timed = []

    def time_candidate(c):
        timed.append(c)
        return {"a": 3.0, "b": 1.0, "c": 2.0}[c]

    assert utils.PersistentChoices("op").pick("M1", "GPU X", ["a", "b", "c"], time_candidate) == "b"
    assert timed == ["a", "b", "c"]
    stored = utils.PersistentChoices("op").path("GPU X")
    assert stored.parent == tmp_path / "crawler_kernels" and json.loads(stored.read_text()) == {"M1": "'b'"}
    # a second process (a fresh object) reads the choice instead of timing
    fresh = utils.PersistentChoices("op")
    assert fresh.pick("M1", "GPU X", ["a", "b", "c"], time_candidate) == "b" and len(timed) == 3
    # another device name, or a stored choice that is no longer a candidate, is timed again
    assert fresh.pick("M1", "GPU Y", ["a", "b", "c"], time_candidate) == "b" and len(timed) == 6
    assert utils.PersistentChoices("op").pick("M1", "GPU X", ["a", "c"], time_candidate) == "c"
    assert len(timed) == 8
    # a corrupt file is a cache miss, and is rewritten whole
    stored.write_text("{not json")
    assert utils.PersistentChoices("op").pick("M1", "GPU X", ["a", "c"], time_candidate) == "c"
    assert json.loads(stored.read_text()) == {"M1": "'c'"}
