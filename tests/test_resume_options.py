"""train.py across a kill: a bare `--resume CHECKPOINT` restores every option of the run and finishes
bitwise equal to the uninterrupted run; options given again are logged, those changing training named.
The default CPU thread count is fixed per machine. Every stage logs the challenge's lines into train.log
(docs/math.md §2)."""
import json
import re

import pytest
import torch
from trainer_fixtures import VOCAB, kill_at_step, make_dataset, restore_threads  # noqa: F401

import train as train_cli
from crawler.checkpoint import read_checkpoint
from crawler.runtime import default_cpu_threads, idle_cpu_threads, resolve_cpu_threads
from crawler.training import TrainConfig, prepare_data, train
from crawler.training.log import peak_memory_line, stopping_early_line

SMALL_MODEL = ["--vocab-size", str(VOCAB), "--train-seq-len", "16", "--train-batch-tokens", "64",
               "--model-set", "model_dim=32", "--model-set", "bigram_buckets=64", "--model-set", "bigram_dim=8",
               "--model-set", "ve_dim=8"]
# Options off their defaults, so a resume that forgot one would show.
RUN = ["--device", "cpu", "--threads", "1", "--max-wallclock-seconds", "0", "--val-every", "2", "--eval-stride", "8",
       "--val-max-tokens", "129", "--log-every", "1", "--muon-dtype", "float32", "--grad-accum-steps", "1",
       "--iterations", "5", "--checkpoint-every", "2", "--matrix-lr", "0.03", "--no-swa", "--qat-small-numel", "0",
       "--quant-plan", "seed", "--ttt-chunk-tokens", "64", "--ttt-lr", "0.001", "--ttt-epochs", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("resume_data"), train_docs=120, val_docs=20)


def cli(*argv) -> int:
    return train_cli.main([str(a) for a in argv])


def base(dataset, out) -> list:
    data_dir, tok = dataset
    return ["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *RUN, "--out-dir", out]


def weights(path):
    return read_checkpoint(path).state_dict


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert cli(*base(dataset, out)) == 0
    return out


@pytest.fixture(scope="module")
def resumed(dataset, uninterrupted, tmp_path_factory):
    """The run killed at step 3 (checkpoint at step 2), then `train.py --resume <checkpoint>` alone."""
    out = tmp_path_factory.mktemp("cut") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        restore = kill_at_step(monkeypatch, 3)
        with pytest.raises(SystemExit):
            cli(*base(dataset, out))
        restore()
    assert cli("--resume", out / "checkpoint.pt") == 0
    return out


def test_bare_resume_restores_every_option_and_is_bitwise_the_uninterrupted_run(uninterrupted, resumed):
    full, cut = (json.loads((d / "summary.json").read_text()) for d in (uninterrupted, resumed))
    assert cut["resumed_from_step"] == 2 and cut["steps"] == full["steps"] == 5
    assert cut["train_config"] == full["train_config"] and cut["model_config"] == full["model_config"]
    a, b = weights(uninterrupted / "final_model.pt"), weights(resumed / "final_model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # everything after training too: the plan, the TTT options, the evaluations
    assert [q["plan"] for q in cut["quantization"]] == ["seed"]
    for key in ("quant_val_bpb", "artifact_bytes"):
        assert cut["quantization"][0][key] == full["quantization"][0][key], key
    assert cut["ttt_epochs"] == 2 and cut["ttt_val_bpb"] == full["ttt_val_bpb"]
    assert cut["sliding_val_bpb"] == full["sliding_val_bpb"]
    log = (resumed / "train.log").read_text()
    assert "resume: the run's options are restored from" in log and "given on the command line" not in log
    assert "options changed" not in log


def test_options_given_on_resume_win_and_those_changing_training_are_named(dataset, resumed, tmp_path, capsys):
    out = tmp_path / "again"
    source = read_checkpoint(resumed / "checkpoint.pt", expect="training")
    assert source.contents["run_options"]["ttt_lr"] == 0.001
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes((resumed / "checkpoint.pt").read_bytes())      # the finished run at step 5
    assert cli("--resume", ckpt, "--out-dir", out, "--iterations", "6", "--log-every", "2", "--threads", "2",
               "--ttt-lr", "0.003", "--no-sliding", "--model-set", "tied_embed_init_std=0.01") == 0
    log = (out / "train.log").read_text()
    assert "given on the command line: --iterations, --log-every, --model-set, --sliding, --threads, --ttt-lr\n" in log
    assert re.search(r"resume: options changed: sliding True -> False, threads 1 -> 2, ttt_lr 0.001 -> 0.003 "
                     r"\(threads changes training: the resumed run is not bit-identical", log)
    assert re.search(r"resume: training options changed: iterations 5 -> 6, log_every 1 -> 2 \(iterations "
                     r"changes training", log)
    assert "resume: model options changed: tied_embed_init_std 0.005 -> 0.01" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_config"]["matrix_lr"] == 0.03     # the rest restored
    assert "sliding_val_bpb" not in summary and summary["ttt_epochs"] == 2


def test_the_default_thread_count_is_fixed_per_machine(monkeypatch):
    """(Two default runs bitwise equal, in processes of their own: tests/test_determinism.py.) The default
    does not follow the load; 'idle' does (and says it is not reproducible)."""
    monkeypatch.setattr("os.getloadavg", lambda: (1000.0, 0.0, 0.0))
    assert resolve_cpu_threads(None) == default_cpu_threads() and idle_cpu_threads() == 1
    assert resolve_cpu_threads(3) == 3 and resolve_cpu_threads("idle") == 1


def parse_exact(log: str, name: str) -> tuple[float, float]:
    """What a parameter-golf log parser reads from `{name}_exact val_loss:... val_bpb:...`."""
    m = re.search(rf"^{name}_exact val_loss:(\d+\.\d{{8}}) val_bpb:(\d+\.\d{{8}})$", log, re.MULTILINE)
    assert m, name
    return float(m.group(1)), float(m.group(2))


def test_every_stage_logs_the_challenges_lines_into_train_log(uninterrupted):
    log = (uninterrupted / "train.log").read_text()
    s = json.loads((uninterrupted / "summary.json").read_text())
    assert re.search(rf"^model_params:{s['n_params']}$", log, re.MULTILINE)
    assert re.search(r"^step:5/5 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:", log, re.MULTILINE)
    q = s["quantization"][0]
    for name, loss, bpb in (("final_int6_roundtrip", q["quant_val_loss"], q["quant_val_bpb"]),
                            ("final_int6_sliding_window", s["sliding_val_loss"], s["sliding_val_bpb"]),
                            ("legal_ttt", s["ttt_val_loss"], s["ttt_val_bpb"])):
        assert parse_exact(log, name) == pytest.approx((loss, bpb), abs=5e-9), name
    for line in (r"final_int6_roundtrip val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms",
                 r"final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:8 eval_time:\d+ms",
                 r"final_ttt_sliding val_loss:\S+ val_bpb:\S+ eval_time:\d+ms"):
        assert re.search(rf"^{line}$", log, re.MULTILINE), line
    assert "quantize: [" in log and "ttt chunk 1/" in log and "int6 val_bpb: legal TTT" in log   # every stage


def test_wallclock_stop_and_peak_memory_lines(dataset, tmp_path):
    data = prepare_data(*dataset, VOCAB, val_max_tokens=129)
    lines = []
    from trainer_fixtures import fast_train_config, small_config
    torch.set_num_threads(1)
    s = train(small_config(train_batch_tokens=64), fast_train_config(iterations=10**6, max_wallclock_seconds=0.5),
              data, ops="reference", log=lines.append).summary
    assert stopping_early_line(s["steps"], 10**6, s["train_time_ms"]) in lines
    assert re.fullmatch(r"stopping_early: wallclock_cap train_time:\d+ms step:\d+/1000000", lines[lines.index(
        stopping_early_line(s["steps"], 10**6, s["train_time_ms"]))])
    assert peak_memory_line(torch.device("cpu")) is None and not any(line.startswith("peak memory") for line in lines)
    assert TrainConfig.trajectory_fields() >= {"iterations", "matrix_lr", "seed"}
    assert not TrainConfig.trajectory_fields() & {"log_every", "val_every", "checkpoint_every"}


@pytest.mark.gpu
def test_peak_memory_line_on_cuda():
    torch.cuda.reset_peak_memory_stats()
    x = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")   # 64 MiB
    line = peak_memory_line(torch.device("cuda"))
    m = re.fullmatch(r"peak memory allocated: (\d+) MiB reserved: (\d+) MiB", line)
    assert m and int(m.group(1)) >= 64 and int(m.group(2)) >= int(m.group(1))
    del x
