"""Nothing lost, nothing silent (data): token ids are range-checked where they enter (each train shard once
when the stream reads it, validation shards, calibration windows, and `kernels.embed` under torch.compile
too); a tokenizer that does not fit the model (smaller than its vocabulary, another file than the one it
was trained with, shards it cannot decode) is refused unless asked for; a training data set too short or
damaged is refused before training."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import filled_crawler
from trainer_fixtures import VOCAB, make_dataset, synthetic_documents

import kernels
from crawler import data as data_mod
from crawler.budget import REPO_ROOT
from crawler.data import read_shard, write_shard
from crawler.errors import SetupError
from crawler.quant import Calibration
from crawler.tokenizer import load_checked_tokenizer, load_tokenizer, tokenizer_identity, train_tokenizer
from crawler.training import prepare_data
from crawler.training.stream import DistributedTokenLoader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("failures_data"), train_docs=60, val_docs=10)


@pytest.fixture(scope="module")
def other_tokenizers(tmp_path_factory):
    """(same size as the dataset's but trained on other text, smaller than the model's vocabulary)."""
    root = tmp_path_factory.mktemp("other_tok")
    docs = synthetic_documents(60, 7)
    return train_tokenizer(docs, root / "other.model", VOCAB) and root / "other.model", \
        train_tokenizer(docs, root / "small.model", 310) and root / "small.model"


def test_train_shard_ids_are_checked_once_per_shard_when_the_stream_reads_it(tmp_path, monkeypatch):
    write_shard(tmp_path / "fineweb_train_000000.bin", torch.randint(0, 50, (400,)))
    bad = torch.randint(0, 50, (400,))
    bad[123] = 77
    write_shard(tmp_path / "fineweb_train_000001.bin", bad)
    with pytest.raises(SetupError, match=r"fineweb_train_000001.bin': token id 77 >= the model's vocab_size 64"):
        read_shard(tmp_path / "fineweb_train_000001.bin", 64)
    checks = []
    real = data_mod.check_token_range
    monkeypatch.setattr(data_mod, "check_token_range", lambda t, v, where: (checks.append(where), real(t, v, where)))
    loader = DistributedTokenLoader(tmp_path, vocab_size=64)
    for _ in range(12):                            # 12 batches of 32 tokens, all inside shard 0
        x, y = loader.next_batch(32, 16)
        assert int(x.max()) < 64
    assert len(checks) == 1 and "000000" in checks[0]
    with pytest.raises(SetupError, match="000001.bin': token id 77"):
        for _ in range(20):
            loader.next_batch(32, 16)
    assert len(checks) == 2
    # without a vocabulary (the loader's own tests), nothing is checked
    DistributedTokenLoader(tmp_path).next_batch(32, 16)


def test_calibration_windows_are_range_checked(tmp_path):
    model = filled_crawler(vocab_size=64)
    write_shard(tmp_path / "fineweb_train_000000.bin", torch.full((200,), 70))
    with pytest.raises(SetupError, match="train shards of .*: token id 70 >= the model's vocab_size 64"):
        Calibration.from_data(model, tmp_path, n_seqs=2, seq_len=16)


def test_embed_checks_ids_under_torch_compile_too():
    g = torch.Generator().manual_seed(0)
    tok, table, proj, gate = (torch.randn(s, generator=g) for s in ((9, 8), (7, 4), (8, 4), (8,)))

    def embed(ids):
        return kernels.embed(ids, tok, table, proj, gate)
    compiled = torch.compile(embed, backend="eager", fullgraph=True)
    ids = torch.randint(0, 9, (2, 5), generator=g)
    torch.testing.assert_close(compiled(ids), kernels.reference.embed(ids, tok, table, proj, gate))
    # One check, in the op, on the device (no host sync): on the CPU it fails at once, eager or compiled.
    for bad in (ids.clone().index_fill_(1, torch.tensor([3]), 9), ids.clone().index_fill_(1, torch.tensor([0]), -1)):
        for fn in (embed, compiled):
            with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 9\)"):
                fn(bad)
    with pytest.raises(ValueError, match=r"expected token ids in \[0, 9\)"):
        compiled(torch.full((1, 4), 9, dtype=torch.int32).to(torch.uint16))


@pytest.mark.gpu
def test_gpu_compiled_embed_stops_at_an_out_of_range_id():
    """On CUDA the compiled check is a device-side assert: the process stops (in a subprocess here) instead
    of reading past the table."""
    script = textwrap.dedent("""
        import torch, kernels
        tok, table, proj, gate = (torch.randn(*s, device="cuda") for s in ((9, 8), (7, 4), (8, 4), (8,)))
        f = torch.compile(lambda i: kernels.embed(i, tok, table, proj, gate), fullgraph=True)
        print(f(torch.randint(0, 9, (2, 64), device="cuda")).shape, flush=True)
        f(torch.full((2, 64), 9, device="cuda"))
        torch.cuda.synchronize()
        print("NOT STOPPED", flush=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "NOT STOPPED" not in proc.stdout
    assert "torch.Size([2, 64, 8])" in proc.stdout
    assert "device-side assert" in proc.stderr or "expected token ids" in proc.stderr, proc.stderr[-2000:]


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_unless_asked_for(dataset, other_tokenizers):
    data_dir, tok = dataset
    other, small = other_tokenizers
    trained = tokenizer_identity(tok, load_tokenizer(tok))
    assert trained["vocab_size"] == VOCAB and len(trained["sha256"]) == 64
    load_checked_tokenizer(tok, VOCAB, trained_with=trained)
    with pytest.raises(SetupError, match=r"other.model' .* is not the one the model was trained with.*"
                                         r"--allow-tokenizer-mismatch"):
        load_checked_tokenizer(other, VOCAB, trained_with=trained)
    assert load_checked_tokenizer(other, VOCAB, trained_with=trained, allow_mismatch=True)[1]["sha256"] != \
        trained["sha256"]
    with pytest.raises(SetupError, match="tokenizer has 310 pieces but the model's vocab_size is 320"):
        load_checked_tokenizer(small, VOCAB)
    load_checked_tokenizer(small, VOCAB, allow_mismatch=True)
    # scoring the dataset's shards with the smaller tokenizer would count ids >= 310 as 0 bytes: refused
    # even when the size difference is allowed
    with pytest.raises(SetupError, match=r"hold token id \d+, beyond the 310 pieces of tokenizer"):
        data_mod.load_eval_data(data_dir, small, VOCAB, allow_mismatch=True)
    with pytest.raises(SetupError, match="not the one the model was trained with"):
        data_mod.load_eval_data(data_dir, other, VOCAB, trained_with=trained)


def test_training_data_is_checked_before_training(dataset, tmp_path):
    data_dir, tok = dataset
    data = prepare_data(data_dir, tok, VOCAB, val_max_tokens=100, min_val_tokens=17)
    assert data.tokenizer == tokenizer_identity(tok, load_tokenizer(tok))
    assert data.identity["tokenizer_sha256"] == data.tokenizer["sha256"]
    with pytest.raises(SetupError, match=r"give 16 tokens .* fewer than one evaluation window needs \(17"):
        prepare_data(data_dir, tok, VOCAB, val_max_tokens=16, min_val_tokens=17)
    with pytest.raises(SetupError, match="vocab_size is 400.*--allow-tokenizer-mismatch.*--vocab-size"):
        prepare_data(data_dir, tok, 400)
    assert prepare_data(data_dir, tok, 400, allow_tokenizer_mismatch=True).luts[0].numel() == 400
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in data_dir.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    shard = sorted(damaged.glob("fineweb_train_*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SetupError, match=r"fineweb_train_000001.bin': size mismatch \(truncated\)"):
        prepare_data(damaged, tok, VOCAB)


def test_triton_ops_on_plain_cpu_tensors_give_one_clear_error(monkeypatch):
    """Without the interpreter, Triton on CPU tensors is refused in one message everywhere (the ops
    themselves: tests/test_utils.py, in a fresh process): by the model and the CLIs' --ops check as a
    SetupError naming the option, by the kernels.modules modules with the ops' own message."""
    from crawler.runtime import resolve_ops
    from kernels.modules import Attention, ReLU2MLP, SoftcappedCrossEntropyLoss
    model = filled_crawler()
    ids = torch.randint(0, 64, (1, 8))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model.ops = "triton"
    with pytest.raises(SetupError, match="--ops triton on cpu: the Triton kernels need a CUDA device"):
        model(ids, ids)
    with pytest.raises(SetupError, match="use --ops reference or auto"):
        resolve_ops("triton", "cpu")
    assert resolve_ops("auto", "cpu") == "reference"
    q, kv = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    calls = {"attention": lambda: Attention()(q, kv, kv),
             "relu2_mlp": lambda: ReLU2MLP(8, 16)(torch.randn(3, 8)),
             "softcapped_cross_entropy": lambda: SoftcappedCrossEntropyLoss()(torch.randn(3, 8), torch.randn(5, 8),
                                                                               torch.tensor([0, 1, 4]))}
    for op, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{op}: \w+ is on cpu; the Triton ops need a CUDA tensor"):
            call()
