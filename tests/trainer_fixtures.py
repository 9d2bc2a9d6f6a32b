"""Shared helpers of the trainer tests: a small synthetic FineWeb-format dataset with its own tokenizer,
a very small model config, a fast TrainConfig and a two-process gloo (CPU DDP) launcher."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crawler.config import CrawlerConfig
from crawler.data import write_shard
from crawler.tokenizer import BOS_ID, train_tokenizer
from crawler.training import TrainConfig

VOCAB = 320
# train.py options of a very small, fast CPU run on make_dataset's data (the model of small_config's size).
CLI_SMALL_MODEL = ["--vocab-size", str(VOCAB), "--train-seq-len", "16", "--train-batch-tokens", "64",
                   "--model-set", "model_dim=32", "--model-set", "bigram_buckets=64", "--model-set", "bigram_dim=8",
                   "--model-set", "ve_dim=8"]
CLI_FAST = ["--device", "cpu", "--threads", "1", "--max-wallclock-seconds", "0", "--val-every", "0",
            "--eval-stride", "8", "--val-max-tokens", "129", "--log-every", "1", "--muon-dtype", "float32",
            "--grad-accum-steps", "1"]
_WORDS = ("the cat dog bird sat ran flew on under over a mat tree roof quickly slowly red green blue "
          "small big and then it was happy sad").split()


def synthetic_documents(n: int, seed: int) -> list[str]:
    """Documents of short sentences over a small vocabulary: learnable structure, not noise."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 8)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def make_dataset(root: Path, *, train_docs: int = 240, val_docs: int = 40, train_shards: int = 2) -> tuple[Path, Path]:
    """Write a tokenizer (VOCAB pieces) and fineweb_{train,val}_*.bin shards under `root`; returns
    (data_dir, tokenizer_path)."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, val = synthetic_documents(train_docs, 0), synthetic_documents(val_docs, 1)
    sp = train_tokenizer(train, root / "tok.model", VOCAB)

    def encode(docs):
        return [t for ids in sp.encode(docs) for t in (BOS_ID, *ids)]

    tokens = encode(train)
    per = len(tokens) // train_shards + 1
    for i in range(train_shards):
        write_shard(data_dir / f"fineweb_train_{i:06d}.bin", tokens[i * per:(i + 1) * per])
    write_shard(data_dir / "fineweb_val_000000.bin", encode(val))
    return data_dir, root / "tok.model"


def small_config(**overrides) -> CrawlerConfig:
    base = dict(vocab_size=VOCAB, model_dim=32, num_heads=4, num_kv_heads=2, bigram_buckets=64,
                bigram_dim=8, ve_dim=8, train_seq_len=16, train_batch_tokens=128)
    return CrawlerConfig.preset("tiny", **{**base, **overrides})


def fast_train_config(**overrides) -> TrainConfig:
    base = dict(iterations=6, max_wallclock_seconds=0.0, warmup_steps=0, grad_accum_steps=1, val_every=0,
                log_every=1, swa_every=2, swa_start_mult=1.01, warmdown_frac=0.5, val_batch_seqs=8,
                checkpoint_every=0, compile=False, muon_dtype="float32", muon_momentum_warmup_steps=4)
    return TrainConfig(**{**base, **overrides})


def kill_at_step(monkeypatch, step: int, exc: type[BaseException] = KeyboardInterrupt):
    """Make the trainer raise `exc` when it is about to run step `step` (a killed run); returns a function
    that puts the real step back."""
    import crawler.training.loop as loop
    original = loop._Trainer.train_step

    def killed(self, s, multiplier):
        if s == step:
            raise exc("killed")
        return original(self, s, multiplier)

    monkeypatch.setattr(loop._Trainer, "train_step", killed)
    return lambda: monkeypatch.setattr(loop._Trainer, "train_step", original)


@pytest.fixture(autouse=True)
def restore_threads():
    """The trainer tests run on one intra-op thread (cheaper on a shared CPU); give the next tests back
    the count they had."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _gloo_process(rank: int, world: int, store: str, worker, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()      # as crawler.runtime.distributed: no rank tears gloo down under a peer's work
    finally:
        dist.destroy_process_group()


def run_gloo(worker, tmp_path: Path, *args, world: int = 2) -> None:
    """Run `worker(rank, world, *args)` (a module-level function) in `world` processes joined in a gloo
    process group, the CPU stand-in for a torchrun DDP job; returns when all have finished."""
    mp.spawn(_gloo_process, args=(world, str(tmp_path / "gloo_store"), worker, args), nprocs=world, join=True)
