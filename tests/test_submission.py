"""From a run to a submission (crawler.submission, crawler.challenge, crawler.budget): a tiny train.py run is
exported once for the module; its train_gpt.py, run by torchrun in a fresh directory with an interpreter
for which this package does not exist, writes the same final_model.pt bytes and the same exact score lines
as train.py, and completes on two gloo processes. The records folder's files, the checks before writing,
the environment variables and the budget's count of code are tested against the same export."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_fixtures import clean_env, isolated_python  # noqa: F401 (a fixture)
from trainer_fixtures import CLI_FAST, CLI_SMALL_MODEL, VOCAB, make_dataset, restore_threads, synthetic_documents  # noqa: F401

import crawler.submission
import train as train_cli
from crawler.budget import BUDGET_BYTES, NOT_EXPORTED, REPO_ROOT, SizeReport, code_files, size_report
from crawler.challenge import CHALLENGE_NAMES, train_argv, variables, with_paths
from crawler.challenge import main as challenge_main
from crawler.config import CrawlerConfig
from crawler.errors import SetupError
from crawler.submission import check_same_options, export_defaults, read_run
from crawler.tokenizer import train_tokenizer

EXACT_LINES = ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact")
# The smallest run that still goes through every stage: 3 steps of 64 tokens, GPTQ on every matrix
# (--qat-small-numel 0: the tiny model's matrices are all below the seed's 65,536 elements), the round trip,
# the sliding window and two TTT chunks on 129 validation tokens.
RUN_OPTIONS = [*CLI_SMALL_MODEL, *CLI_FAST, "--iterations", "3", "--qat-small-numel", "0", "--ttt-chunk-tokens", "64"]
RECORDS_FIELDS = ("author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "seeds",
                  "seed_results", "bytes_total", "bytes_code", "hardware", "pytorch_version")
RECORD_JSON = REPO_ROOT.parent.parent / "shared" / "reference" / "pg" / "varlen_record_1530_submission.json"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(data dir, tokenizer, run dir, records folder) of one train.py run and its export."""
    root = tmp_path_factory.mktemp("submission")
    data, tok = make_dataset(root, train_docs=60, val_docs=10)
    assert train_cli.main(["--data-dir", str(data), "--tokenizer", str(tok), *RUN_OPTIONS,
                           "--out-dir", str(root / "run")]) == 0
    assert crawler.submission.main([str(root / "run"), "--name", "Tiny crawler", "--author", "A. Author",
                                    "--github-id", "aauthor", "--blurb", "A test.", "--date", "2026-01-02",
                                    "--records-dir", str(root / "records")]) == 0
    folder = root / "records" / "track_10min_16mb" / "2026-01-02_Tiny_crawler"
    return data, tok, root / "run", folder


def _lines(log: str, names) -> dict[str, str]:
    return {line.split()[0]: line for line in log.splitlines() if line.split()[:1] and line.split()[0] in names}


def run_exported(python, folder: Path, workdir: Path, data: Path, tok: Path, nproc: int) -> subprocess.CompletedProcess:
    """train_gpt.py alone in `workdir` (a fresh directory), run by torchrun with `nproc` processes and an
    interpreter that cannot import this package; its home and temporary directories are its own."""
    workdir.mkdir()
    shutil.copy(folder / "train_gpt.py", workdir / "train_gpt.py")
    home, tmp = (workdir.parent / f"{workdir.name}_{d}" for d in ("home", "tmp"))
    home.mkdir()
    tmp.mkdir()
    env = clean_env(DATA_PATH=str(data), TOKENIZER_PATH=str(tok), RUN_ID="check", HOME=str(home), TMPDIR=str(tmp))
    return subprocess.run([str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train_gpt.py"], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def test_exported_train_gpt_reproduces_train_py(exported, isolated_python, tmp_path):  # noqa: F811
    data, tok, run, folder = exported
    proc = run_exported(isolated_python, folder, tmp_path / "fresh", data, tok, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "fresh" / "runs" / "check"                     # RUN_ID names the run directory
    assert (out / "final_model.pt").read_bytes() == (run / "final_model.pt").read_bytes()
    ours, theirs = ((d / "train.log").read_text() for d in (out, run))
    assert _lines(ours, EXACT_LINES) == _lines(theirs, EXACT_LINES) and len(_lines(ours, EXACT_LINES)) == 3
    # It wrote nothing outside its run directory: its home is empty, its temporary directory holds only
    # torch's own (the launcher's logs, the compiler cache directory torch creates).
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["runs", "train_gpt.py"]
    assert not list((tmp_path / "fresh_home").iterdir())
    assert all(p.name.startswith("torch") for p in (tmp_path / "fresh_tmp").iterdir())


def test_exported_train_gpt_runs_on_two_gloo_processes(exported, isolated_python, tmp_path):  # noqa: F811
    data, tok, _, folder = exported
    proc = run_exported(isolated_python, folder, tmp_path / "fresh", data, tok, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world 2" in proc.stdout and "model_params:" in proc.stdout and "step:3/3 train_loss:" in proc.stdout
    assert "step:3/3 val_loss:" in proc.stdout and len(_lines(proc.stdout, EXACT_LINES)) == 3


def test_the_budget_counts_the_exported_train_gpt_py(exported):
    """What a run counts as code (its artifact was pruned against it) is train_gpt.py's size to the byte."""
    _, _, run, folder = exported
    size = (folder / "train_gpt.py").stat().st_size
    assert size_report(0).code_bytes == size == read_run(run, train_cli.ARTIFACT_NAME).counted_code_bytes
    assert size < crawler.submission.SEED_CODE_BYTES
    ok = SizeReport(BUDGET_BYTES - size, size)
    ok.check()
    over = SizeReport(BUDGET_BYTES - size + 1, size, code_bytes_source=123)
    with pytest.raises(ValueError, match=r"over the size budget.*123 B as source files.*OVER by 1 B"):
        over.check()


def test_counted_modules_are_what_a_run_imports():
    """train_gpt.py carries exactly the modules that importing train.py, the challenge's interface and the
    lazily loaded GPTQ kernel load in a fresh interpreter: none missing, none extra."""
    script = ("import sys, train, crawler.challenge, kernels; kernels.gptq_quantize; "
              "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    ours = [REPO_ROOT / "crawler", REPO_ROOT / "kernels", REPO_ROOT / "train.py"]
    loaded = {p.resolve() for p in map(Path, out.stdout.split()) if any(p.resolve().is_relative_to(d) for d in ours)}
    assert loaded == {p.resolve() for p in code_files()}
    assert not {REPO_ROOT.joinpath(*name.split(".")).with_suffix(".py") for name in NOT_EXPORTED} & loaded


def test_records_folder(exported):
    _, _, run, folder = exported
    logs = (run / "train.log").read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                        "train_gpt.py", "train_seed1337.log"]
    assert (folder / "train_seed1337.log").read_bytes() == logs
    info = json.loads((folder / "submission.json").read_text())
    assert set(RECORDS_FIELDS) <= set(info)
    if RECORD_JSON.is_file():       # the same JSON types as a real record's submission.json
        record = json.loads(RECORD_JSON.read_text())
        assert {k: type(v) for k, v in info.items() if k in record} == {k: type(record[k]) for k in info if k in record}
    ttt = _lines(logs.decode(), ["legal_ttt_exact"])["legal_ttt_exact"].split()
    assert f"val_bpb:{info['val_bpb']:.8f}" == ttt[2] and f"val_loss:{info['val_loss']:.8f}" == ttt[1]
    assert info["seeds"] == [1337] and info["seed_results"]["1337"]["val_bpb"] == info["val_bpb"]
    assert info["bytes_code"] == (folder / "train_gpt.py").stat().st_size
    script = (folder / "train_gpt.py").read_bytes().decode("ascii")           # plain text: printable ASCII lines
    assert all(line.isprintable() for line in script.split("\n")) and script.count("\n") == 3
    assert info["bytes_total"] == info["bytes_code"] + (run / train_cli.ARTIFACT_NAME).stat().st_size
    assert (info["name"], info["author"], info["github_id"], info["date"]) == ("Tiny crawler", "A. Author", "aauthor",
                                                                              "2026-01-02")
    requirements = (folder / "requirements.txt").read_text().split()
    assert {r.split("==")[0].lower() for r in requirements} >= {"torch", "triton", "numpy", "sentencepiece", "brotli"}
    readme = (folder / "README.md").read_text()
    assert f"{info['val_bpb']:.8f}" in readme and f"{info['bytes_code']:,}" in readme and "torchrun" in readme


def test_export_checks_before_writing(exported, tmp_path, monkeypatch, capsys):
    data, _, run, folder = exported
    base = [str(run), "--name", "Tiny crawler", "--author", "A", "--github-id", "a", "--date", "2026-01-02"]

    def refused(*argv, records=tmp_path / "records") -> str:
        assert crawler.submission.main([*base, "--records-dir", str(records), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("python -m crawler.submission: error:")
        return err

    # an earlier export is replaced only with --overwrite
    assert "already holds" in refused(records=folder.parents[1]) and "--overwrite" in refused(records=folder.parents[1])
    assert crawler.submission.main([*base, "--records-dir", str(folder.parents[1]), "--overwrite"]) == 0
    capsys.readouterr()
    # the tokenizer the submission is scored with must be the one the artifact was trained with
    train_tokenizer(synthetic_documents(30, 7), tmp_path / "other.model", VOCAB)
    assert "is not the one the model was trained with" in refused("--tokenizer", str(tmp_path / "other.model"))
    # the artifact must fit beside train_gpt.py
    monkeypatch.setattr(crawler.submission, "BUDGET_BYTES", 50_000)
    assert "over the 50,000 B budget" in refused()
    monkeypatch.undo()
    # a run directory must hold a finished run
    assert crawler.submission.main([str(tmp_path / "nope"), *base[1:], "--records-dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "train.log", partial / "train.log")
    assert crawler.submission.main([str(partial), *base[1:], "--records-dir", str(tmp_path)]) == 2
    assert "has no summary.json, checkpoint.pt, model.int6.ptz" in capsys.readouterr().err
    assert not (tmp_path / "records").exists() and not (tmp_path / "track_10min_16mb").exists()


def test_seeds_must_share_every_other_option(exported):
    _, _, run_dir, _ = exported
    run = read_run(run_dir, train_cli.ARTIFACT_NAME)
    defaults = export_defaults(run, train_cli)
    other_seed = dataclasses.replace(run, train_config={**run.train_config, "seed": 1})
    check_same_options([run, other_seed], [defaults, {**defaults, "SEED": "1"}], "SEED")
    with pytest.raises(SetupError, match=r"differs from .* in more than the seed \(ITERATIONS\)"):
        check_same_options([run, other_seed], [defaults, {**defaults, "SEED": "1", "ITERATIONS": "9"}], "SEED")
    with pytest.raises(SetupError, match="repeat a seed"):
        check_same_options([run, run], [defaults, defaults], "SEED")


def test_environment_variables_become_train_py_options():
    parser = train_cli.build_parser()
    names = variables(parser)
    dests = {a.dest for a in parser._actions} - {"help"}
    fields = {f.name for f in dataclasses.fields(CrawlerConfig)}
    assert set(CHALLENGE_NAMES.values()) <= dests | fields             # no misspelt destination
    assert set(names.values()) >= dests and len(set(names.values())) == len(names)   # one name each
    assert all(name in CHALLENGE_NAMES or name.startswith("CRAWLER_") for name in names)
    env = {"SEED": "7", "TTT_ENABLED": "0", "MODEL_DIM": "64", "CRAWLER_MODEL_SET": "ve_dim=8 'xsa=\"none\"'",
           "TIE_EMBEDDINGS": "yes", "CRAWLER_OVERWRITE": "1", "LOOP_AWARE_GPTQ": "off", "PATH": "/bin"}
    args = parser.parse_args(train_argv(parser, env))
    assert (args.seed, args.ttt, args.overwrite, args.loop_aware) == (7, False, True, False)
    assert args.model_set == ["ve_dim=8", 'xsa="none"', "model_dim=64", "tie_embeddings=true"]
    with pytest.raises(SetupError, match=r"TTT_ENABLED='maybe': expected 1 or 0"):
        train_argv(parser, {"TTT_ENABLED": "maybe"})
    paths = with_paths({"VOCAB_SIZE": "8192", "RUN_ID": "r"})
    assert (paths["DATA_PATH"], paths["TOKENIZER_PATH"], paths["ARTIFACT_DIR"]) == (
        "./data/datasets/fineweb10B_sp8192", "./data/tokenizers/fineweb_8192_bpe.model", "runs/r")
    paths = with_paths({"VOCAB_SIZE": "1024", "DATA_DIR": "/d/", "TOKENIZER_PATH": "t.model", "ARTIFACT_DIR": "a"})
    assert (paths["DATA_PATH"], paths["TOKENIZER_PATH"], paths["ARTIFACT_DIR"]) == (
        "/d/datasets/fineweb10B_sp1024", "t.model", "a")
    docs = (REPO_ROOT / "docs" / "submission.md").read_text()
    assert [name for name in names if f"`{name}`" not in docs] == []     # every variable is documented


def test_train_gpt_takes_no_arguments_and_its_help_lists_the_variables(capsys):
    assert challenge_main(train_cli, {}, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: [VARIABLE=VALUE ...] torchrun") and "docs/submission.md" in out
    assert all(name in out for name in ("DATA_DIR", "RUN_ID", *variables(train_cli.build_parser())))
    assert challenge_main(train_cli, {}, ["--iterations", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "train_gpt.py: error: no arguments are taken, got --iterations 5: set environment variables (--help)"
