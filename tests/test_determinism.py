"""Two identical CPU runs at the default thread count are bitwise equal (README, "Command line"): each a
train.py in a process of its own, as a user runs it, compared by the bytes of final_model.pt. The batch is
large enough (tokens x model_dim >= 32,768) for PyTorch to split the embedding's gradient accumulation
over threads, which without crawler.runtime.reproducible adds rows in a racy order."""
import os
import subprocess
import sys

import pytest
import torch
from trainer_fixtures import VOCAB, make_dataset

from crawler.budget import REPO_ROOT
from crawler.checkpoint import read_checkpoint
from crawler.runtime import default_cpu_threads, reproducible

RUN = ["--vocab-size", VOCAB, "--train-seq-len", "32", "--train-batch-tokens", "2048", "--model-set", "model_dim=64",
       "--model-set", "bigram_buckets=64", "--model-set", "bigram_dim=8", "--model-set", "ve_dim=8",
       "--device", "cpu", "--iterations", "6", "--max-wallclock-seconds", "0", "--val-every", "0",
       "--no-val-at-start", "--val-max-tokens", "33", "--muon-dtype", "float32", "--grad-accum-steps", "1",
       "--no-quantize", "--no-baselines"]


@pytest.mark.skipif(default_cpu_threads() < 2, reason="one core: every run is single-threaded")
def test_two_default_cpu_runs_write_the_same_final_model_bytes(tmp_path):
    data_dir, tok = make_dataset(tmp_path, train_docs=120, val_docs=10, train_shards=1)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    argv = [sys.executable, str(REPO_ROOT / "train.py"), "--data-dir", str(data_dir), "--tokenizer", str(tok),
            *map(str, RUN)]
    runs = [subprocess.Popen([*argv, "--out-dir", str(tmp_path / name)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    a, b = ((tmp_path / name / "final_model.pt").read_bytes() for name in ("a", "b"))
    assert a == b
    saved = read_checkpoint(tmp_path / "a" / "checkpoint.pt", expect="training").contents["run_options"]
    assert saved["threads"] == default_cpu_threads()             # the runs were multi-threaded


def test_reproducible_is_for_the_cpu_and_restores_the_previous_setting():
    assert not torch.are_deterministic_algorithms_enabled()
    with reproducible("cpu"):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with reproducible("meta"):
        assert not torch.are_deterministic_algorithms_enabled()
