"""train.py's command line: --help documents every option, each setup error says what to do, a small
run writes its outputs and a killed run continues with --resume."""
import dataclasses
import json

import pytest
from trainer_fixtures import CLI_FAST as FAST
from trainer_fixtures import CLI_SMALL_MODEL as SMALL_MODEL
from trainer_fixtures import VOCAB, kill_at_step, make_dataset, restore_threads  # noqa: F401

import train as train_cli
from crawler.training import TrainConfig


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli_data"), train_docs=120, val_docs=20)


def run_cli(argv, capsys):
    code = train_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--out-dir", "--resume", "--iterations", "--max-wallclock-seconds", "--ops",
                 "--data-dir", "--tokenizer", "--seed", "--val-every", "--train-batch-tokens", "--train-seq-len",
                 "--grad-accum-steps", "--vocab-size", "--model-set", "--threads", "--baselines"):
        assert flag in out, flag
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
    parser = train_cli.build_parser()
    undocumented = [a.option_strings for a in parser._actions if not a.help]
    assert not undocumented


def test_missing_data_dir(dataset, tmp_path, capsys):
    _, tok = dataset
    code, _, err = run_cli(["--data-dir", tmp_path / "nope", "--tokenizer", tok, *SMALL_MODEL, *FAST], capsys)
    assert code == 2 and "does not exist" in err and "--data-dir" in err


def test_no_matching_shards(dataset, tmp_path, capsys):
    _, tok = dataset
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["--data-dir", tmp_path / "empty", "--tokenizer", tok, *SMALL_MODEL, *FAST], capsys)
    assert code == 2 and "no shards matching 'fineweb_train_*.bin'" in err and "--data-dir" in err


def test_missing_tokenizer(dataset, capsys):
    data_dir, _ = dataset
    code, _, err = run_cli(["--data-dir", data_dir, *SMALL_MODEL, *FAST], capsys)
    assert code == 2 and "--tokenizer" in err


def test_tokenizer_vocab_mismatch(dataset, capsys):
    data_dir, tok = dataset
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *FAST, "--vocab-size", "300"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and f"tokenizer has {VOCAB} pieces" in err and "--vocab-size" in err


def test_batch_not_divisible_into_sequences(dataset, capsys):
    data_dir, tok = dataset
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *FAST, "--train-batch-tokens", "100"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "does not split into whole sequences of 16" in err and "--train-batch-tokens" in err


def test_world_size_not_dividing_8(dataset, monkeypatch, capsys):
    data_dir, tok = dataset
    monkeypatch.setenv("WORLD_SIZE", "3")
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *FAST[:-2]]   # default grad accum
    assert "--grad-accum-steps" not in argv
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "world size 3 does not divide 8" in err and "--grad-accum-steps" in err


def test_bad_model_option(capsys):
    code, _, err = run_cli(["--model-set", "model_dim=33", *FAST], capsys)
    assert code == 2 and "model_dim" in err


def test_run_then_resume_after_a_kill(dataset, tmp_path, capsys, monkeypatch):
    data_dir, tok = dataset
    out = tmp_path / "run"
    base = ["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *FAST, "--checkpoint-every", "2",
            "--out-dir", out, "--baselines"]
    restore = kill_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as exc:
        run_cli([*base, "--iterations", "5"], capsys)
    assert exc.value.code == 130
    assert f"--resume {out / 'checkpoint.pt'}" in capsys.readouterr().err
    restore()
    assert (out / "checkpoint.pt").is_file() and not (out / "summary.json").exists()

    # The resumed run goes on through every later stage: quantise (all four plans) -> artifact -> evaluate.
    post = ["--quant-small-numel", "0", "--compare-quant", "--ttt-chunk-tokens", "64"]
    code, stdout, _ = run_cli([*base, *post, "--iterations", "5", "--resume", out / "checkpoint.pt"], capsys)
    assert code == 0
    assert "resume: continuing" in stdout and "step:5/5 val_loss:" in stdout
    for row in ("unigram baseline val_bpb", "untrained val_bpb", "pre-quant val_bpb", "tokens/s", "step_avg",
                "int6 round trip (a)", "int6 round trip (b)", "int6 round trip (c)", "int6 round trip (d)",
                "artifact + code bytes", "int6 val_bpb: plain", "int6 val_bpb: sliding window, stride 8",
                "int6 val_bpb: legal TTT, 1 epoch(s) (reduced from 3 on CPU)"):
        assert row in stdout, row
    assert (out / "model.int6.ptz").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and summary["resumed_from_step"] == 2
    assert summary["unigram_val_bpb"] > 0 and summary["initial_val_bpb"] > summary["final_val_bpb"]
    assert (out / "final_model.pt").is_file()
    assert [q["plan"] for q in summary["quantization"]] == ["rtn_seed_floor", "seed", "default", "default"]
    assert summary["sliding_val_bpb"] > 0 and summary["ttt_val_bpb"] > 0


def test_eval_stride_longer_than_the_sequence_is_refused_before_training(dataset, capsys):
    data_dir, tok = dataset
    code, _, err = run_cli(["--data-dir", data_dir, "--tokenizer", tok, *SMALL_MODEL, *FAST, "--eval-stride", "64"],
                           capsys)
    assert code == 2 and "--eval-stride 64" in err and "sequence length 16" in err
