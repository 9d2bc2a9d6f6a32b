"""Two processes on one run directory: the directory lock (crawler.fileio.hold_directory_lock) held by
train.py for its whole run (fresh or resumed) and by crawler.quantize for --out's directory. A second
process fails at once with one `error:` line naming the holder's PID; a killed holder never blocks."""
import os
import subprocess
import sys
import time

import pytest
from trainer_fixtures import CLI_FAST, CLI_SMALL_MODEL, make_dataset, restore_threads  # noqa: F401

import train as train_cli
from crawler import quantize
from crawler.budget import REPO_ROOT
from crawler.errors import SetupError
from crawler.fileio import LOCK_NAME, hold_directory_lock


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("locks_data"), train_docs=60, val_docs=10, train_shards=1)


def start_train(argv: list, stderr) -> subprocess.Popen:
    """train.py in a process of its own (a user's second terminal), its stderr into the file `stderr`."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr.open("w"))


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def refused(capsys, argv: list) -> str:
    """train.py's main in this process with `argv`: it must fail with one `error:` line; returns it."""
    code = train_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("train.py: error: "), (code, err)
    return lines[0]


def test_a_second_run_on_a_directory_in_use_fails_at_once_naming_the_holder(dataset, tmp_path, capsys):
    data_dir, tok = dataset
    out = tmp_path / "run"
    argv = ["--data-dir", data_dir, "--tokenizer", tok, *CLI_SMALL_MODEL, *CLI_FAST, "--no-baselines",
            "--no-quantize", "--no-val-at-start", "--checkpoint-every", "1", "--out-dir", out]
    first = start_train([*argv, "--iterations", 10**6], tmp_path / "first.err")
    try:
        wait_for(first, lambda: (out / "checkpoint.pt").is_file(), "its first checkpoint")
        log = (out / "train.log").read_bytes()
        # the same command again, and one that would replace the run in progress: both refused by the lock
        for extra in ([], ["--overwrite"]):
            line = refused(capsys, [*argv, *extra, "--iterations", 2])
            assert f"--out-dir {str(out)!r} is in use by another run (PID {first.pid} holds" in line, (extra, line)
        assert (out / "train.log").read_bytes()[:len(log)] == log and first.poll() is None
    finally:
        first.kill()                 # a run killed without cleaning up: its lock file stays behind
        first.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
    # a dead holder never blocks: two resumes of its checkpoint, the second refused while the first runs
    resume = ["--resume", out / "checkpoint.pt"]
    again = start_train([*resume, "--iterations", 10**6], tmp_path / "again.err")
    try:
        wait_for(again, lambda: b"resume: continuing" in (out / "train.log").read_bytes(), "the resume to start")
        line = refused(capsys, [*resume, "--matrix-lr", 0.05, "--iterations", 3])
        assert f"is in use by another run (PID {again.pid} holds" in line, line
    finally:
        again.kill()
        again.wait()


def test_the_lock_is_one_per_directory_released_on_exit_and_taken_by_quantize(tmp_path, capsys):
    with hold_directory_lock(tmp_path / "new" / "dir", "--x") as held:
        assert (held / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(SetupError, match=rf"--x .* is in use by another run \(PID {os.getpid()} holds"):
            with hold_directory_lock(held, "--x"):
                pass
        # crawler.quantize holds --out's directory before reading anything
        code = quantize.main([str(a) for a in ("--checkpoint", tmp_path / "none.pt", "--out", held / "a.ptz",
                                                "--plan", "rtn_seed_floor")])
        err = capsys.readouterr().err
        assert code == 2 and f"--out {str(held)!r} is in use by another run (PID {os.getpid()}" in err, err
    assert not (held / LOCK_NAME).exists()
    with hold_directory_lock(held, "--x"):          # released: taken again
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(SetupError, match="is a file, not a directory"):
        with hold_directory_lock(tmp_path / "file", "--x"):
            pass
