"""Nothing lost, nothing silent (files): a write that fails on a full disk or a read-only location says so
and leaves the previous file; killed writes' temporary files are cleaned up; checkpoints and artifacts
are verified (checksums over the contents and the artifact header), decompression and configs are
bounded before anything is allocated, and files of the previous formats still load, with a warning."""
import errno
import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import pytest
import torch
from conftest import brotli_or_skip_module, filled_crawler

from crawler import artifact as artifact_mod
from crawler import fileio
from crawler.artifact import (
    HEADER_BYTES,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    Artifact,
    ArtifactError,
    decode_artifact,
    encode_artifact,
    frame_payload,
    load_artifact,
    save_artifact,
)
from crawler.budget import REPO_ROOT
from crawler.checkpoint import (
    INTEGRITY_KEY,
    MODEL_FORMAT,
    TRAINING_FORMAT,
    TRAINING_VERSION,
    CheckpointError,
    read_checkpoint,
    save_checkpoint,
    save_model,
)
from crawler.config import CrawlerConfig
from crawler.errors import MissingFileError, SetupError, UnverifiedWarning
from crawler.fileio import WriteError, check_writable_file, prepare_output_dir, remove_stale_temps, write_json

brotli = brotli_or_skip_module()

TOKENIZER = {"sha256": "ab" * 32, "vocab_size": 64}


def small_artifact(seed: int = 0, **config) -> Artifact:
    model = filled_crawler(seed, **config)
    return Artifact(model.config.to_dict(), {n: t.float() for n, t in model.state_dict().items()}, TOKENIZER)


def quick_encode(art: Artifact) -> bytes:
    """The file bytes at brotli quality 1 (the same format; only the size differs from quality 11)."""
    return encode_artifact(art, quality=1)


def dead_pid() -> int:
    """The pid of a process that has exited (reaped, so nothing runs under it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def run_with_file_size_limit(code: str, limit: int, cwd) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose files cannot grow past `limit` bytes (RLIMIT_FSIZE: a full disk
    as the writer sees it, EFBIG on write; SIGXFSZ ignored so the write fails instead of killing it)."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------------
# Writes: full disk, read-only, killed writes, output paths

def test_full_disk_keeps_the_previous_checkpoint_and_artifact_and_says_so(tmp_path):
    small = {"format": MODEL_FORMAT, "model_config": filled_crawler().config.to_json(),
             "model": {"w": torch.randn(8)}}
    save_checkpoint(tmp_path / "final_model.pt", small)
    save_artifact(Artifact({}, {"w": torch.randn(8)}), tmp_path / "model.int6.ptz")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    limit = max(len(b) for b in before.values()) + 4096          # the new files need 4x that
    proc = run_with_file_size_limit("""
        import torch
        from crawler.artifact import Artifact, save_artifact
        from crawler.checkpoint import save_checkpoint
        from crawler.fileio import WriteError
        big = torch.randn(1 << 12)
        for name, write in (("final_model.pt", lambda p: save_checkpoint(p, {"model": {"w": big}})),
                            ("model.int6.ptz", lambda p: save_artifact(Artifact({}, {"w": big}), p))):
            try:
                write(name)
            except WriteError as e:
                print("WriteError:", e)
            else:
                print("written:", name)
    """, limit, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("WriteError: could not write") for line in lines), proc.stdout
    for line in lines:
        assert "File too large" in line and "full" in line and "the previous file is unchanged" in line, line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before      # intact, no temporary file left
    assert read_checkpoint(tmp_path / "final_model.pt").state_dict["w"].numel() == 8
    load_artifact(tmp_path / "model.int6.ptz")


def test_read_only_location_is_named_before_and_during_a_write(tmp_path, monkeypatch):
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
    else:  # root writes through permission bits: fail the system call as a read-only filesystem does
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if str(path).startswith(str(target)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(fileio.os, "open", read_only)
    try:
        with pytest.raises(WriteError, match=r"cannot write .*summary\.json.*read-only or not writable"):
            write_json(target / "summary.json", {"a": 1})
        with pytest.raises(SetupError, match=r"--out: cannot write in .*ro.*read-only or not writable"):
            check_writable_file(target / "a.ptz", "--out")
        with pytest.raises(SetupError, match=r"--out-dir: cannot write in .*read-only"):
            prepare_output_dir(target, "--out-dir")
    finally:
        target.chmod(0o755)
    assert list(target.iterdir()) == []


def test_killed_writes_leave_temporary_files_that_the_next_write_removes(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = tmp_path / f".summary.json.{dead}.0123abcd.tmp"
    other_target = tmp_path / f".train.log.{dead}.0123abcd.tmp"
    running = tmp_path / f".summary.json.{alive}.0123abcd.tmp"        # a live writer's file stays
    foreign = [tmp_path / ".summary.json.tmp", tmp_path / "notes.0123abcd.tmp", tmp_path / f".x.{dead}.zz.tmp"]
    for p in (stale, other_target, running, *foreign):
        p.write_bytes(b"partial")
    write_json(tmp_path / "summary.json", {"ok": True})
    assert not stale.exists() and other_target.exists() and running.exists()   # only the same target's
    assert all(p.exists() for p in foreign)                                      # never another file
    assert remove_stale_temps(tmp_path) == [other_target]                       # a run's directory: all
    assert running.exists() and all(p.exists() for p in foreign)


def test_output_paths_are_checked_before_the_work(tmp_path):
    with pytest.raises(SetupError, match=r"--out .*: directory .*missing.* does not exist"):
        check_writable_file(tmp_path / "missing" / "a.ptz", "--out")
    with pytest.raises(SetupError, match="is a directory"):
        check_writable_file(tmp_path, "--out")
    assert check_writable_file(tmp_path / "a.ptz", "--out") == tmp_path / "a.ptz"
    (tmp_path / "file").write_text("x")
    with pytest.raises(SetupError, match="is a file, not a directory"):
        prepare_output_dir(tmp_path / "file", "--out-dir")
    run = prepare_output_dir(tmp_path / "run" / "nested", "--out-dir", outputs=("summary.json",))
    assert run.is_dir() and list(run.iterdir()) == []
    (run / "summary.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SetupError, match=r"already holds a run \(summary.json\): pass --resume"):
        prepare_output_dir(run, "--out-dir", outputs=("summary.json", "final_model.pt"), hint="pass --resume")
    assert (run / "summary.json").exists()
    prepare_output_dir(run, "--out-dir", outputs=("summary.json",), replace=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]               # only the run's outputs go


# --------------------------------------------------------------------------------------------------
# Checkpoints: checksum, older files, tokenizer identity

def _flip_one_weight_bit(path, tensor: torch.Tensor) -> None:
    """Flip the top exponent bit of one float of `tensor` inside the file (found by its bytes)."""
    blob = bytearray(path.read_bytes())
    needle = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = blob.find(needle)
    assert at >= 0 and blob.find(needle, at + 1) < 0
    blob[at + 7] ^= 0x40                     # byte 3 of float 1: its exponent
    path.write_bytes(bytes(blob))


def test_a_flipped_weight_bit_is_refused_by_the_checksum(tmp_path):
    model = filled_crawler(2)
    state = model.state_dict()
    save_model(tmp_path / "final_model.pt", model.config, state, tokenizer=TOKENIZER)
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": TRAINING_FORMAT, "version": TRAINING_VERSION,
                                                 "model_config": model.config.to_json(), "model": state,
                                                 "optimizers": [{"lr": 0.1, "dtype": torch.bfloat16}],
                                                 "data": {"tokenizer_sha256": "cd" * 32, "tokenizer_vocab_size": 60}})
    assert read_checkpoint(tmp_path / "final_model.pt").tokenizer == TOKENIZER
    assert read_checkpoint(tmp_path / "checkpoint.pt").tokenizer == {"sha256": "cd" * 32, "vocab_size": 60}
    for name in ("final_model.pt", "checkpoint.pt"):
        _flip_one_weight_bit(tmp_path / name, state["tok_emb.weight"])
        with pytest.raises(CheckpointError, match=rf"{name}' is corrupt: its contents do not match the checksum"):
            read_checkpoint(tmp_path / name)


def test_files_without_a_checksum_still_load(tmp_path):
    model = filled_crawler(1)
    state = model.state_dict()
    # PR #1579's final_model.pt: a plain state dict, which never carried a checksum: loads, no warning
    torch.save(state, tmp_path / "pr1579.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = read_checkpoint(tmp_path / "pr1579.pt")
    assert plain.kind == "state_dict" and plain.tokenizer is None
    # a final_model.pt written before checksums: loads, with a warning that it cannot be verified
    torch.save({"format": MODEL_FORMAT, "model_config": model.config.to_json(), "model": state}, tmp_path / "old.pt")
    with pytest.warns(UnverifiedWarning, match="has no checksum"):
        old = read_checkpoint(tmp_path / "old.pt")
    assert all(torch.equal(old.state_dict[k], v) for k, v in state.items()) and old.tokenizer is None
    saved = torch.load(tmp_path / "old.pt", weights_only=True)
    save_checkpoint(tmp_path / "new.pt", saved)
    assert INTEGRITY_KEY in torch.load(tmp_path / "new.pt", weights_only=True)


def test_unreadable_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="is not a file"):
        read_checkpoint(tmp_path)
    model = filled_crawler()
    save_model(tmp_path / "m.pt", model.config, model.state_dict())
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="may be truncated"):
        read_checkpoint(tmp_path / "cut.pt")


# --------------------------------------------------------------------------------------------------
# Artifacts: the header under the checksum, bounded decompression, bounded configs, format 1

def test_every_header_bit_flip_is_refused_and_none_claims_a_newer_version():
    blob = quick_encode(small_artifact())
    for byte in range(HEADER_BYTES):
        for bit in (0, 7):
            damaged = bytearray(blob)
            damaged[byte] ^= 1 << bit
            with pytest.raises(ArtifactError) as exc:
                decode_artifact(bytes(damaged))
            message = str(exc.value)
            assert "newer version" not in message, (byte, bit, message)
            expected = "not a crawler artifact" if byte < len(MAGIC) else r"corrupt|truncated"
            assert any(word in message for word in expected.split("|")), (byte, bit, message)


def test_decompression_is_bounded_by_the_header_and_a_cap(monkeypatch):
    bomb = brotli.compress(b"\0" * (64 << 20), quality=5)        # 64 MiB from a few hundred bytes
    assert len(bomb) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match="decompresses to more than 4,096 bytes"):
            decode_artifact(frame_payload(bomb, 4096))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"decoding a 64 MiB bomb declared as 4 KiB allocated {peak:,} B"
    with pytest.raises(ArtifactError, match=f"declares {MAX_PAYLOAD_BYTES + 1:,} decompressed bytes"):
        decode_artifact(frame_payload(bomb, MAX_PAYLOAD_BYTES + 1))
    honest = quick_encode(small_artifact())
    raw = struct.unpack_from("<Q", honest, 20)[0]
    with pytest.raises(ArtifactError, match="ends early|decompresses to"):
        decode_artifact(frame_payload(honest[HEADER_BYTES:], raw + 1))        # declared size disagrees
    # format 1 declares no size: its own cap bounds it
    monkeypatch.setattr(artifact_mod, "FORMAT_1_MAX_PAYLOAD_BYTES", 1 << 16)
    with pytest.warns(UnverifiedWarning), pytest.raises(ArtifactError, match="more than 65,536 bytes"):
        decode_artifact(format_1_file(bomb))


def format_1_file(payload: bytes) -> bytes:
    """A format-1 file around `payload`: magic, version 1, payload length, SHA-256 of the payload."""
    return struct.pack("<8sIQ32s", MAGIC, 1, len(payload), hashlib.sha256(payload).digest()) + payload


def test_a_format_1_bomb_is_refused_within_a_small_memory_bound(tmp_path):
    """512 MiB of zeros in a valid format-1 frame (no declared size): refused once the output passes what a
    budget-sized artifact can hold, the peak RSS of the reading process measured (it was ~1.9 GB)."""
    compressor = brotli.Compressor(quality=1)
    zeros = bytes(16 << 20)
    bomb = b"".join([*(compressor.process(zeros) for _ in range(32)), compressor.finish()])
    path = tmp_path / "bomb.ptz"
    path.write_bytes(format_1_file(bomb))
    code = textwrap.dedent(f"""
        import resource, warnings
        from crawler.artifact import ArtifactError, load_artifact
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        warnings.simplefilter("ignore")
        try:
            load_artifact({str(path)!r})
        except ArtifactError as e:
            print(e)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, grown = proc.stdout.strip().splitlines()
    assert f"decompresses to more than {artifact_mod.FORMAT_1_MAX_PAYLOAD_BYTES:,} bytes" in message
    assert int(grown) < 4 * artifact_mod.FORMAT_1_MAX_PAYLOAD_BYTES, f"peak RSS grew by {int(grown):,} B"


def test_a_crafted_config_is_refused_before_any_module_is_built():
    art = small_artifact()
    for field, value in (("crawler_loops", 10**6), ("model_dim", 1 << 20), ("num_flat_blocks", 10**5),
                         ("vocab_size", 1 << 20), ("crawler_loops", 2.5), ("train_seq_len", True)):
        crafted = quick_encode(Artifact({**art.config, field: value}, art.tensors))
        t0 = time.perf_counter()
        with pytest.raises(ArtifactError, match=f"invalid model config.*{field}"):
            decode_artifact(crafted)
        assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ValueError, match="crawler_loops must be an int <= 256"):
        CrawlerConfig.preset("tiny", crawler_loops=257)


def test_format_1_artifacts_still_load_with_a_warning(monkeypatch):
    art = small_artifact(3)
    monkeypatch.setattr(artifact_mod, "FORMAT_VERSION", 1)       # the old writer's metadata ...
    raw = artifact_mod.byte_shuffle(artifact_mod._safetensors_bytes(Artifact(art.config, art.tensors)))
    monkeypatch.undo()
    v1 = format_1_file(brotli.compress(raw))                      # ... and its 52-byte header
    with pytest.warns(UnverifiedWarning, match="artifact format 1.*re-export"):
        back = decode_artifact(v1)
    assert back.tokenizer is None and back.config == art.config
    assert all(torch.equal(back.tensors[n], t) for n, t in art.tensors.items())
    damaged = bytearray(v1)
    damaged[60] ^= 1
    with pytest.raises(ArtifactError, match="corrupt: SHA-256 of the payload"):
        decode_artifact(bytes(damaged))


def test_tokenizer_identity_round_trips_and_a_bad_one_is_corrupt():
    art = small_artifact()
    assert decode_artifact(quick_encode(art)).tokenizer == TOKENIZER
    assert decode_artifact(quick_encode(Artifact(art.config, art.tensors))).tokenizer is None
    for bad in ({"sha256": "xyz", "vocab_size": 64}, {"sha256": "ab" * 32}, {"sha256": "ab" * 32, "vocab_size": -1}):
        with pytest.raises(ArtifactError, match="metadata 'tokenizer'"):
            decode_artifact(quick_encode(Artifact(art.config, art.tensors, bad)))


def test_artifact_files_that_cannot_be_one(tmp_path, monkeypatch):
    with pytest.raises(MissingFileError, match="does not exist"):
        load_artifact(tmp_path / "none.ptz")
    with pytest.raises(ArtifactError, match="is not a file"):
        load_artifact(tmp_path)
    save_artifact(small_artifact(), tmp_path / "a.ptz")
    monkeypatch.setattr(artifact_mod, "MAX_FILE_BYTES", 1000)
    with pytest.raises(ArtifactError, match="more than any artifact may be"):
        load_artifact(tmp_path / "a.ptz")
