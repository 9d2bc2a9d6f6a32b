"""Nothing lost, nothing silent (command lines): train.py, crawler.quantize, crawler.evaluate and
crawler.generate check every option, file and output path before the work, end every expected failure in
one `prog: error: ...` line with exit status 2, never replace a finished run without --overwrite, keep
the trained model when the disk fills at the end, and check the tokenizer against the recorded one."""
import dataclasses
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import filled_crawler
from test_failures_files import _flip_one_weight_bit, run_with_file_size_limit
from trainer_fixtures import CLI_FAST, CLI_SMALL_MODEL, VOCAB, make_dataset, restore_threads, synthetic_documents  # noqa: F401

import crawler.budget
import train as train_cli
from crawler import evaluate, generate, quantize
from crawler.artifact import load_artifact, save_artifact
from crawler.budget import REPO_ROOT
from crawler.checkpoint import INTEGRITY_KEY, read_checkpoint, save_checkpoint, save_model
from crawler.config import CrawlerConfig
from crawler.errors import SetupError
from crawler.quant import build_artifact
from crawler.tokenizer import load_tokenizer, tokenizer_identity, train_tokenizer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("failures_cli"), train_docs=120, val_docs=20)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer of the dataset's size trained on other text: not the one the model was trained with."""
    path = tmp_path_factory.mktemp("other_tok") / "other.model"
    train_tokenizer(synthetic_documents(120, 9), path, VOCAB)
    return path


@pytest.fixture(scope="module")
def model_files(dataset, tmp_path_factory):
    """final_model.pt of a small random model of the dataset's vocabulary (recording its tokenizer), and
    its round-to-nearest int6 artifact (also recording it)."""
    _, tok = dataset
    root = tmp_path_factory.mktemp("model_files")
    model = filled_crawler(0, vocab_size=VOCAB)
    identity = tokenizer_identity(tok, load_tokenizer(tok))
    save_model(root / "final_model.pt", model.config, model.state_dict(), tokenizer=identity)
    build_artifact(model, None, plan="rtn_seed_floor", out_path=root / "model.ptz", tokenizer=identity, log=None)
    return root


def run(main, argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, prog: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# train.py

def test_a_finished_run_is_never_replaced_without_a_flag(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    base = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--out-dir", out,
            "--no-quantize", "--no-baselines", "--iterations", "2", "--checkpoint-every", "1"]
    code, _, err = run(train_cli.main, base, capsys)
    line = one_error_line(err, "train.py")
    assert code == 2 and "already holds a run (summary.json)" in line and "--resume" in line and "--overwrite" in line
    assert json.loads((out / "summary.json").read_text()) == {"old": True}
    code, _, err = run(train_cli.main, [*base, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    final = read_checkpoint(out / "final_model.pt")              # checksum verified
    assert final.tokenizer == tokenizer_identity(tok, load_tokenizer(tok))
    code, _, err = run(train_cli.main, base, capsys)              # the finished run, without a flag
    assert code == 2 and "already holds a run" in err
    # continuing it in place is allowed; a damaged checkpoint is refused by name
    code, _, err = run(train_cli.main, [*base, "--iterations", "3", "--resume", out / "checkpoint.pt"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    _flip_one_weight_bit(out / "checkpoint.pt", read_checkpoint(out / "checkpoint.pt").state_dict["tok_emb.weight"])
    code, _, err = run(train_cli.main, [*base, "--iterations", "4", "--resume", out / "checkpoint.pt"], capsys)
    assert code == 2 and "is corrupt: its contents do not match the checksum" in one_error_line(err, "train.py")


def test_init_from_weights_of_another_tokenizer_is_refused_as_resume_and_evaluate_refuse(dataset, other_tokenizer,
                                                                                          tmp_path, capsys):
    data_dir, tok = dataset
    config = CrawlerConfig.preset("tiny", vocab_size=VOCAB, train_seq_len=16, train_batch_tokens=64, model_dim=32,
                                  bigram_buckets=64, bigram_dim=8, ve_dim=8)
    from crawler.model import CrawlerGPT
    weights = tmp_path / "final_model.pt"
    save_model(weights, config, CrawlerGPT(config, ops="reference").state_dict(),
               tokenizer=tokenizer_identity(other_tokenizer, load_tokenizer(other_tokenizer)))
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--no-quantize", "--no-baselines",
            "--iterations", "1", "--init-from", weights]
    code, _, err = run(train_cli.main, [*argv, "--out-dir", tmp_path / "a"], capsys)
    line = one_error_line(err, "train.py")
    assert code == 2 and f"is not the one --init-from {str(weights)!r} was trained with" in line, line
    assert "--allow-tokenizer-mismatch" in line and not (tmp_path / "a" / "final_model.pt").exists()
    code, _, err = run(train_cli.main, [*argv, "--out-dir", tmp_path / "b", "--allow-tokenizer-mismatch"], capsys)
    assert code == 0, err


def test_options_are_refused_before_anything_runs(dataset, tmp_path, capsys, monkeypatch):
    data_dir, tok = dataset
    out = tmp_path / "run"
    base = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--out-dir", out]
    refused = [
        (["--val-max-tokens", "10"], "--val-max-tokens 10 is shorter than one evaluation window (sequence length 16"),
        (["--target-bytes", "1000"], "--target-bytes 1,000 leaves no room for the artifact"),
        (["--ttt-chunk-tokens", "8"], "chunk_tokens (8) must be >= seq_len (16)"),
        (["--eval-stride", "32"], "--eval-stride 32 must be in [1, sequence length 16]"),
        (["--resume", tmp_path / "none.pt"], "does not exist"),
        (["--doc-isolated", "--compile"], "--doc-isolated --compile on cpu with the reference ops: document-isolated "
                                          "attention compiles only with the Triton kernels on CUDA"),
    ]
    for extra, message in refused:
        code, _, err = run(train_cli.main, [*base, *extra], capsys)
        assert code == 2 and message in one_error_line(err, "train.py"), (extra, err)
        assert not out.exists(), extra                               # nothing was started, nothing written
    from crawler.training import TrainConfig
    assert TrainConfig(doc_isolated=True).compiles("cpu") is False        # the library refuses it the same way
    with pytest.raises(SetupError, match="--doc-isolated --compile on cpu"):
        TrainConfig(doc_isolated=True, compile=True).compiles("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, _, err = run(train_cli.main, [*base, "--ops", "triton"], capsys)
    assert code == 2 and "--ops triton on cpu: the Triton kernels need a CUDA device" in err
    monkeypatch.undo()
    for extra, expected in ((["--val-max-tokens", "-5"], "expected an integer"),
                            (["--threads", "0"], "expected a thread count >= 1 or 'idle'"),
                            (["--ttt-chunk-tokens", "x"], "expected an integer")):
        with pytest.raises(SystemExit) as exc:
            run(train_cli.main, [*base, *extra], capsys)
        assert exc.value.code == 2 and f"argument {extra[0]}: {expected}" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    code, _, err = run(train_cli.main, [*base[:-1], tmp_path / "file"], capsys)
    assert code == 2 and "is a file, not a directory" in one_error_line(err, "train.py")


def test_bad_training_data_ends_in_one_line(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    bad = tmp_path / "data"
    bad.mkdir()
    for p in data_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    argv = ["--data-dir", bad, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--no-baselines", "--no-quantize",
            "--iterations", "2"]
    shard = bad / "fineweb_train_000001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-7])
    code, _, err = run(train_cli.main, [*argv, "--out-dir", tmp_path / "a"], capsys)
    assert code == 2 and "size mismatch (truncated)" in one_error_line(err, "train.py")
    from crawler.data import write_shard
    write_shard(bad / "fineweb_train_000000.bin", [1, 2, 999] * 200)           # an id past the vocabulary
    shard.write_bytes(original)
    code, _, err = run(train_cli.main, [*argv, "--out-dir", tmp_path / "b"], capsys)
    assert code == 2 and "token id 999 >= the model's vocab_size 320" in one_error_line(err, "train.py")
    write_shard(bad / "fineweb_val_000000.bin", [1, 5, 6, 7] * 3)
    code, _, err = run(train_cli.main, [*argv, "--out-dir", tmp_path / "c"], capsys)
    assert code == 2 and "fewer than one evaluation window needs (17" in one_error_line(err, "train.py")


def test_empty_train_shards_and_non_finite_or_negative_float_options_end_in_one_line(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "fineweb_val_000000.bin").write_bytes((data_dir / "fineweb_val_000000.bin").read_bytes())
    from crawler.data import write_shard
    write_shard(empty / "fineweb_train_000000.bin", [])
    argv = ["--data-dir", empty, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--no-baselines", "--no-quantize",
            "--iterations", "2", "--out-dir", tmp_path / "run"]
    code, _, err = run(train_cli.main, argv, capsys)
    assert code == 2 and "hold no tokens (1 shard(s), all empty)" in one_error_line(err, "train.py")
    # every float option of the training recipe is range-checked while parsing: argparse's one line, exit 2
    from crawler.training import TrainConfig
    floats = [f.name for f in dataclasses.fields(TrainConfig) if TrainConfig.__annotations__[f.name] == "float"]
    assert {"matrix_lr", "adam_beta2", "ema_decay", "warmdown_frac"} <= set(floats)
    for name in floats:
        flag = "--" + name.replace("_", "-")
        for text in ("nan", "-1", "inf", "x"):
            with pytest.raises(SystemExit) as exc:
                train_cli.main([flag, text])
            lines = capsys.readouterr().err.strip().splitlines()
            assert exc.value.code == 2 and lines[-1].startswith(f"train.py: error: argument {flag}: expected "), lines
    for flag, text, expected in (("--matrix-lr", "nan", "a finite number >= 0, got nan"),
                                 ("--matrix-lr", "-1", "a finite number >= 0, got -1.0"),
                                 ("--adam-beta1", "1", "a number in [0, 1), got 1.0"),
                                 ("--adam-eps", "0", "a finite number > 0, got 0.0")):
        with pytest.raises(SystemExit):
            train_cli.main([flag, text])
        assert f"argument {flag}: expected {expected}" in capsys.readouterr().err
    # the same ranges hold for a recipe from elsewhere (a resumed checkpoint's)
    with pytest.raises(SetupError, match=r"TrainConfig: matrix_lr: expected a finite number >= 0, got nan"):
        TrainConfig(matrix_lr=float("nan")).validate()


def test_resume_of_a_checkpoint_whose_config_and_tensors_disagree_ends_in_one_line(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    out = tmp_path / "run"
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--no-quantize", "--no-baselines",
            "--iterations", "1", "--out-dir", out]
    code, _, err = run(train_cli.main, argv, capsys)
    assert code == 0, err
    contents = torch.load(out / "checkpoint.pt", weights_only=True)
    config = json.loads(contents["model_config"])
    contents["model_config"] = json.dumps({**config, "mlp_mult": 2 * config["mlp_mult"]})     # not a run option
    save_checkpoint(out / "checkpoint.pt", {k: v for k, v in contents.items() if k != INTEGRITY_KEY})  # checksum holds
    code, _, err = run(train_cli.main, ["--resume", out / "checkpoint.pt", "--iterations", "2"], capsys)
    line = one_error_line(err, "train.py")
    assert code == 2 and "its weights or optimiser states do not fit the model config it records" in line, line
    assert re.search(r"'\S+mlp\.fc\.weight' has shape \(128, 32\), the model expects \(256, 32\)", line), line


def test_a_disk_that_fills_at_the_end_keeps_the_trained_model(dataset, tmp_path):
    data_dir, tok = dataset
    config = CrawlerConfig.preset("tiny", vocab_size=VOCAB, train_seq_len=16, train_batch_tokens=64, model_dim=32,
                                  bigram_buckets=64, bigram_dim=8, ve_dim=8)
    from crawler.model import CrawlerGPT
    buffer = io.BytesIO()
    torch.save({"model": CrawlerGPT(config, ops="reference").state_dict()}, buffer)
    final_bytes = buffer.tell()
    # Room for final_model.pt (+ its config, checksum and tokenizer) but not for checkpoint.pt, which adds
    # the optimiser state: the disk is full when the last checkpoint is written.
    limit = int(final_bytes * 1.3)
    out = tmp_path / "run"
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--out-dir", out,
            "--no-quantize", "--no-baselines", "--iterations", "2"]
    proc = run_with_file_size_limit(f"import sys, train; sys.exit(train.main({[str(a) for a in argv]!r}))",
                                    limit, REPO_ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr, "train.py")
    assert "could not write" in line and "checkpoint.pt" in line and "File too large" in line, line
    assert "the trained model is safe in" in line and "final_model.pt" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["final_model.pt", "summary.json", "train.log"]
    final = read_checkpoint(out / "final_model.pt")              # complete and verified
    assert final.config == CrawlerConfig.from_dict(json.loads(final.contents["model_config"]))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------------------------------
# crawler.quantize

def test_quantize_checks_everything_before_quantising(dataset, model_files, other_tokenizer, tmp_path, capsys):
    data_dir, tok = dataset
    prog = "python -m crawler.quantize"
    ckpt = model_files / "final_model.pt"
    base = ["--device", "cpu", "--plan", "rtn_seed_floor", "--small-numel", "0"]
    for argv, message in (
        (["--checkpoint", ckpt, "--out", tmp_path / "missing" / "a.ptz"], "directory"),
        (["--checkpoint", tmp_path / "none.pt", "--out", tmp_path / "a.ptz"], "does not exist"),
        (["--checkpoint", ckpt, "--out", tmp_path / "a.ptz", "--json", tmp_path], "is a directory"),
        (["--checkpoint", ckpt, "--out", tmp_path / "a.ptz", "--target-bytes", "10"], "leaves no room"),
        (["--checkpoint", ckpt, "--out", tmp_path / "a.ptz", "--role", "bogus=rtn"], "unknown role 'bogus'"),
        (["--checkpoint", ckpt, "--out", ckpt], "is the --checkpoint itself"),
        (["--checkpoint", ckpt, "--out", tmp_path / "a.ptz", "--eval", "--data-dir", data_dir, "--tokenizer",
          other_tokenizer], "is not the one the model was trained with"),
    ):
        code, out, err = run(quantize.main, [*base, *argv], capsys)
        assert code == 2 and message in one_error_line(err, prog), (argv, err)
        assert not (tmp_path / "a.ptz").exists() and out == "", argv        # refused before quantising
    with pytest.raises(SystemExit):
        run(quantize.main, [*base, "--checkpoint", ckpt, "--out", tmp_path / "a.ptz", "--n-seqs", "0"], capsys)
    assert "argument --n-seqs: expected an integer >= 1, got 0" in capsys.readouterr().err
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(ckpt.read_bytes())
    _flip_one_weight_bit(damaged, read_checkpoint(ckpt).state_dict["tok_emb.weight"])
    code, _, err = run(quantize.main, [*base, "--checkpoint", damaged, "--out", tmp_path / "a.ptz"], capsys)
    assert code == 2 and "is corrupt" in one_error_line(err, prog)
    code, _, err = run(quantize.main, [*base, "--checkpoint", ckpt, "--out", tmp_path / "a.ptz"], capsys)
    assert code == 0, err
    assert load_artifact(tmp_path / "a.ptz").tokenizer == read_checkpoint(ckpt).tokenizer   # carried over


# --------------------------------------------------------------------------------------------------
# crawler.evaluate and crawler.generate

def test_evaluate_checks_options_and_the_tokenizer_and_names_the_budget(dataset, model_files, other_tokenizer,
                                                                      capsys, monkeypatch):
    data_dir, tok = dataset
    prog = "python -m crawler.evaluate"
    base = ["--artifact", model_files / "model.ptz", "--data-dir", data_dir, "--tokenizer", tok, "--device", "cpu",
            "--mode", "plain", "--max-val-tokens", "200"]
    with pytest.raises(SystemExit) as exc:
        run(evaluate.main, [*base, "--seq-len", "0"], capsys)
    assert exc.value.code == 2 and "argument --seq-len: expected an integer >= 1, got 0" in capsys.readouterr().err
    code, out, err = run(evaluate.main, [*base, "--max-val-tokens", "16"], capsys)
    assert code == 2 and "max_val_tokens must be >= one window" in one_error_line(err, prog)
    code, out, err = run(evaluate.main, base, capsys)
    assert code == 0, err
    assert "budget: artifact" in out and "fits" in out and out.strip().splitlines()[-1].endswith("budget:fits")
    code, out, err = run(evaluate.main, [*base[:5], other_tokenizer, *base[6:]], capsys)
    assert code == 2 and "is not the one the model was trained with" in one_error_line(err, prog)
    assert "--allow-tokenizer-mismatch" in err
    code, out, err = run(evaluate.main, [*base[:5], other_tokenizer, *base[6:], "--allow-tokenizer-mismatch"], capsys)
    assert code == 0, err
    unrecorded = model_files / "unrecorded.ptz"         # written without a tokenizer identity
    save_artifact(dataclasses.replace(load_artifact(model_files / "model.ptz"), tokenizer=None), unrecorded)
    code, out, err = run(evaluate.main, [base[0], unrecorded, *base[2:]], capsys)
    assert code == 0 and err.strip() == (f"{prog}: warning: artifact {str(unrecorded)!r} records no tokenizer "
                                         f"identity: {str(tok)!r} cannot be checked against the one it was "
                                         f"trained with"), err
    real = crawler.budget.size_report
    monkeypatch.setattr(crawler.budget, "size_report", lambda n: real(n, budget=1000))
    code, out, err = run(evaluate.main, base, capsys)
    assert code == 0 and "OVER by" in out and out.strip().splitlines()[-1].endswith("budget:OVER")


def test_generate_checks_the_tokenizer(dataset, model_files, other_tokenizer, capsys):
    _, tok = dataset
    base = ["--artifact", model_files / "model.ptz", "--device", "cpu", "--max-new-tokens", "2", "--prompt", "the"]
    code, _, err = run(generate.main, [*base, "--tokenizer", other_tokenizer], capsys)
    line = one_error_line(err, "python -m crawler.generate")
    assert code == 2 and "is not the one the model was trained with" in line
    code, out, err = run(generate.main, [*base, "--tokenizer", tok], capsys)
    assert code == 0 and "generated 2 tokens" in err and "warning" not in err
    with pytest.raises(SystemExit):
        run(generate.main, [*base, "--tokenizer", tok, "--top-k", "-1"], capsys)


def test_every_cli_fails_in_one_line_in_a_fresh_process(tmp_path):
    """The entry points in a process of their own, as a user runs them: a missing file is one line and
    exit status 2 each, no traceback."""
    script = ("import sys; from crawler import evaluate, generate, quantize; print([\n"
              " evaluate.main(['--artifact', 'none.ptz', '--data-dir', '.', '--device', 'cpu']),\n"
              " generate.main(['--artifact', 'none.ptz', '--tokenizer', 't.model', '--device', 'cpu']),\n"
              " quantize.main(['--checkpoint', 'none.pt', '--out', 'a.ptz', '--plan', 'rtn_seed_floor'])])")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "[2, 2, 2]", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"python -m crawler.{m}" for m in ("evaluate", "generate",
                                                                                          "quantize")], lines
    assert all(": error: " in line and "does not exist" in line for line in lines), lines
