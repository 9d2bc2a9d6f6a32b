"""The training loop of the seed's recipe (SPEC §2): single process or torchrun DDP, resumable.

Stages, each callable on its own (train.py strings them together):
  `setup_distributed()`  -> DistContext (inits NCCL on GPU / gloo on CPU under torchrun)
  `prepare_data(...)`    -> TrainData (tokenizer, byte LUTs, validation tokens, data identity)
  `train(...)`           -> TrainResult (the trained model, weights averaged, QAT off; a summary dict)

Per step: `grad_accum_steps` micro-batches (bf16 autocast on GPU, DDP syncing only the last), Muon
momentum warm-up, LR multiplier on the wall-clock (or iteration) budget, global grad clip, the three
optimisers, then SWA collection / EMA update, logging, the wall-clock stop and checkpoints. Every rank
takes the same decisions: the elapsed time that drives the LR, SWA and the stop is all-reduced (MAX).

Checkpoints hold only tensors and plain containers, are written atomically and are read with
`torch.load(weights_only=True)`, so loading one cannot run code. A run resumed from a checkpoint
produces the same weights as the uninterrupted run (iteration budget, same world size, deterministic
device such as the CPU); under a wall-clock budget the LR follows the restored elapsed time.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from crawler.config import CrawlerConfig
from crawler.data import DistributedTokenLoader, list_shards, load_validation_tokens, read_shard
from crawler.evaluate import val_bpb
from crawler.fileio import atomic_open, file_sha256
from crawler.model import CrawlerGPT
from crawler.optim import build_optimizers, lr_multiplier, muon_momentum_at, set_lr_multiplier
from crawler.tokenizer import byte_luts, check_vocab, load_tokenizer

CHECKPOINT_FORMAT = "crawler-train-checkpoint"
CHECKPOINT_VERSION = 1
FINAL_MODEL_FORMAT = "crawler-model"
GLOBAL_BATCH_MICROSTEPS = 8      # the seed's grad_accum_steps = 8 // world_size
# Config fields that describe how a run feeds data, not the model: they may differ on resume.
_NON_ARCH_FIELDS = ("train_seq_len", "train_batch_tokens")


class SetupError(ValueError):
    """A problem with the run's inputs (paths, sizes, a checkpoint that does not fit) that the user can
    fix; the message says how. train.py prints it without a traceback."""


def _opt(default, help_text: str, choices=None):
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class TrainConfig:
    """Every training hyper-parameter; the defaults are the seed's (PR #1579, SPEC §2) for a GPU run.
    Batch size and sequence length come from the model config (`train_batch_tokens`, `train_seq_len`)."""
    iterations: int = _opt(20000, "number of optimiser steps (the LR budget when no wall-clock cap)")
    max_wallclock_seconds: float = _opt(600.0, "stop training after this much training time; also the LR "
                                        "budget (0 = no cap, the iteration count is the budget)")
    warmdown_frac: float = _opt(0.6, "fraction of the budget at its end over which the LR decays linearly to 0")
    warmup_steps: int = _opt(100, "compile warm-up steps run before training; model, optimiser and loader "
                             "state are restored afterwards")
    grad_accum_steps: int = _opt(0, "micro-batches per step (0 = 8 // world_size, the seed's)")
    seed: int = _opt(1337, "random seed for the model initialisation")
    matrix_lr: float = _opt(0.02, "Muon learning rate (block matrices, bigram.proj, ve.proj)")
    tied_embed_lr: float = _opt(0.02, "AdamW learning rate of tok_emb, bigram.table, ve.table")
    scalar_lr: float = _opt(0.01, "AdamW learning rate of the scalar/vector parameters")
    muon_momentum: float = _opt(0.99, "Muon momentum after warm-up")
    muon_momentum_warmup_start: float = _opt(0.85, "Muon momentum at step 0")
    muon_momentum_warmup_steps: int = _opt(500, "steps of the linear Muon momentum warm-up")
    muon_backend_steps: int = _opt(5, "Newton-Schulz iterations")
    muon_weight_decay: float = _opt(0.085, "Muon decoupled weight decay (p *= 1 - lr*wd after the update)")
    muon_row_normalize: bool = _opt(False, "MuonEq-R: normalise the rows of the update before Newton-Schulz")
    muon_polar_express: bool = _opt(False, "Polar-Express Newton-Schulz coefficients instead of the fixed ones")
    muon_dtype: str = _opt("bfloat16", "Newton-Schulz dtype: bfloat16 (the seed's) or float32 (CPUs without "
                           "bf16 matmul units run bf16 ~20x slower)", choices=("bfloat16", "float32"))
    adam_weight_decay: float = _opt(0.085, "AdamW weight decay (both AdamW groups)")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.95, "AdamW beta2")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip_norm: float = _opt(0.3, "global gradient-norm clip (0 = off)")
    qat: bool = _opt(True, "int6 QAT (straight-through) on Linears with > 65,536 weights, from step 0")
    swa: bool = _opt(True, "SWA: average snapshots taken every swa_every steps while the LR multiplier < "
                     "swa_start_mult, loaded at the end")
    swa_every: int = _opt(50, "steps between SWA snapshots")
    swa_start_mult: float = _opt(0.2, "SWA collects while the LR multiplier is below this")
    ema: bool = _opt(False, "EMA of the weights (replaces SWA at the end when on)")
    ema_decay: float = _opt(0.997, "EMA decay per step")
    val_every: int = _opt(1000, "validate every N steps (0 = only at the end)")
    val_at_start: bool = _opt(True, "validate the untrained model at step 0")
    val_batch_seqs: int = _opt(32, "validation sequences per forward pass per rank")
    log_every: int = _opt(200, "train-loss log line every N steps (and the first 10 steps)")
    checkpoint_every: int = _opt(0, "write the resumable checkpoint every N steps (0 = only at the end)")
    compile: typing.Optional[bool] = _opt(None, "torch.compile the model (default: on CUDA only)")

    def validate(self) -> None:
        """Raise SetupError naming the field and what is expected."""
        def need(cond, msg):
            if not cond:
                raise SetupError(f"TrainConfig: {msg}")
        for name in ("iterations", "swa_every", "val_batch_seqs", "muon_backend_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "grad_accum_steps", "val_every", "log_every", "checkpoint_every",
                     "muon_momentum_warmup_steps", "max_wallclock_seconds", "grad_clip_norm"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(0 < self.warmdown_frac <= 1, f"warmdown_frac must be in (0, 1], got {self.warmdown_frac}")
        need(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        need(self.muon_dtype in ("bfloat16", "float32"),
             f"muon_dtype must be 'bfloat16' or 'float32', got {self.muon_dtype!r}")

    @classmethod
    def add_arguments(cls, parser) -> None:
        """One `--flag-name` per field (booleans get `--x/--no-x`), help text and default shown, all
        defaulting to None (= not given) so `overrides()` returns only what the user set."""
        import argparse
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group("training hyper-parameters (defaults: the seed's recipe; the "
                                          "built-in corpus demo changes a few, see above)")
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            help_text = f.metadata["help"]
            if f.default is not None:
                help_text += f" (default: {f.default})"
            flag = "--" + f.name.replace("_", "-")
            if kind in (bool, typing.Optional[bool]):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif f.metadata["choices"]:
                group.add_argument(flag, choices=f.metadata["choices"], default=None, help=help_text)
            else:
                group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help_text)

    @classmethod
    def overrides(cls, namespace) -> dict:
        """The fields given on the command line (not None) in an argparse namespace from add_arguments."""
        return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                if getattr(namespace, f.name, None) is not None}


# --------------------------------------------------------------------------------------------------
# Distributed set-up

@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_grad_accum(tc: TrainConfig, world_size: int) -> int:
    """`tc.grad_accum_steps`, or 8 // world_size (SPEC §2); SetupError if world_size does not divide 8."""
    if tc.grad_accum_steps:
        return tc.grad_accum_steps
    if world_size < 1 or GLOBAL_BATCH_MICROSTEPS % world_size:
        raise SetupError(f"world size {world_size} does not divide {GLOBAL_BATCH_MICROSTEPS}: the seed's "
                         f"recipe runs 8 // world_size micro-batches per step. Launch 1, 2, 4 or 8 "
                         f"processes, or set --grad-accum-steps explicitly")
    return GLOBAL_BATCH_MICROSTEPS // world_size


def setup_distributed(device: str | None = None) -> DistContext:
    """The process's place in the run. Under torchrun (WORLD_SIZE > 1) initialises the default process
    group (NCCL on CUDA, gloo on CPU) unless it already is; with one process, nothing to initialise.
    `device` ("cpu" | "cuda") defaults to CUDA when available."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def default_cpu_threads() -> int:
    """Intra-op threads for CPU training: the cores not already busy (1-minute load average), at least
    1. OpenMP threads competing for busy cores slow every op down many times over."""
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0])
    except OSError:
        busy = 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))   # torchrun ranks on this machine share it
    return max(1, min(cores, cores - busy) // local_world)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _current_context() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dev)
    return DistContext(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------------------------------
# Data

@dataclass
class TrainData:
    """What training and evaluation read: the shard directory, the tokenizer and its byte LUTs, the
    validation tokens, and `identity` (tokenizer hash, shard names and sizes) that a checkpoint records
    so a resume on other data is refused."""
    data_dir: Path
    tokenizer_path: Path
    tokenizer_vocab_size: int
    luts: tuple
    val_tokens: torch.Tensor
    identity: dict

    def train_token_counts(self, vocab_size: int, max_tokens: int | None = None) -> torch.Tensor:
        """Occurrences of each id (int64, length vocab_size) in the train shards, in order, stopping
        after `max_tokens` tokens when given (FineWeb's train split is billions of tokens)."""
        counts = torch.zeros(vocab_size, dtype=torch.int64)
        seen = 0
        for path in list_shards(self.data_dir, "train"):
            tokens = read_shard(path).to(torch.int64)
            if max_tokens is not None:
                tokens = tokens[: max_tokens - seen]
            counts += torch.bincount(tokens, minlength=vocab_size)[:vocab_size]
            seen += tokens.numel()
            if max_tokens is not None and seen >= max_tokens:
                break
        return counts


def prepare_data(data_dir, tokenizer_path, vocab_size: int, *, val_max_tokens: int | None = None) -> TrainData:
    """Check and load a FineWeb-format data directory and its SentencePiece tokenizer for a model of
    `vocab_size`. `val_max_tokens` keeps only the first validation tokens (quick evaluations).
    Raises SetupError (saying what to do) for a missing directory, missing shards, a missing or invalid
    tokenizer, or a tokenizer with more pieces than the model's vocabulary."""
    data_dir, tokenizer_path = Path(data_dir), Path(tokenizer_path)
    hint = ("point --data-dir at a directory of parameter-golf FineWeb shards (fineweb_train_*.bin and "
            "fineweb_val_*.bin), or leave it out to use the built-in corpus")
    try:
        train_shards = list_shards(data_dir, "train")
        val_shards = list_shards(data_dir, "val")
    except FileNotFoundError as e:
        raise SetupError(f"{e}: {hint}") from None
    try:
        sp = load_tokenizer(tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"{e}: pass --tokenizer with the SentencePiece .model the shards were encoded "
                         f"with") from None
    try:
        check_vocab(sp, vocab_size)
    except ValueError as e:
        raise SetupError(f"{e} (option --vocab-size, or --tokenizer)") from None
    try:
        val_tokens = load_validation_tokens(data_dir)
    except ValueError as e:
        raise SetupError(f"{e}: {hint}") from None
    if val_max_tokens is not None:
        val_tokens = val_tokens[:val_max_tokens]
    identity = {"tokenizer_sha256": file_sha256(tokenizer_path), "tokenizer_vocab_size": sp.vocab_size(),
                "train_shards": [[p.name, p.stat().st_size] for p in train_shards],
                "val_shards": [[p.name, p.stat().st_size] for p in val_shards]}
    return TrainData(data_dir=data_dir, tokenizer_path=tokenizer_path, tokenizer_vocab_size=sp.vocab_size(),
                     luts=byte_luts(sp, vocab_size), val_tokens=val_tokens, identity=identity)


def check_batch_shape(batch_tokens: int, seq_len: int, world_size: int, grad_accum: int) -> int:
    """Tokens per micro-batch per rank; SetupError unless the global batch splits into whole sequences
    over world_size × grad_accum micro-batches."""
    unit = world_size * grad_accum * seq_len
    if batch_tokens <= 0 or seq_len <= 0 or batch_tokens % unit:
        raise SetupError(f"train batch of {batch_tokens} tokens does not split into whole sequences of "
                         f"{seq_len} over {world_size} rank(s) x {grad_accum} micro-batch(es) (needs a "
                         f"multiple of {unit}): pass --train-batch-tokens as a multiple of {unit}, or change "
                         f"--train-seq-len / --grad-accum-steps")
    return batch_tokens // (world_size * grad_accum)


# --------------------------------------------------------------------------------------------------
# Logging

class RunLogger:
    """Lines to stdout and `out_dir/train.log` (appended, so a resumed run continues the log), from the
    main rank only."""

    def __init__(self, out_dir: Path | None, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.path = out_dir / "train.log" if (out_dir is not None and enabled) else None

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, file=self.stream, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------------------
# Weight averaging

class WeightAverager:
    """SWA: the uniform mean of model snapshots, summed in float32 on the CPU (so it costs no device
    memory). `average()` returns a state dict in the model's dtypes."""

    def __init__(self):
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}

    def collect(self, model: nn.Module) -> None:
        for name, t in model.state_dict().items():
            t = t.detach().to("cpu", torch.float32)
            if name in self.sums:
                self.sums[name] += t
            else:
                self.sums[name] = t.clone()
        self.count += 1

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("WeightAverager: no snapshot collected")
        return {name: (self.sums[name] / self.count).to(t.dtype) for name, t in like.items()}

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sums = int(state["count"]), dict(state["sums"])


class EMA:
    """Exponential moving average of the weights, float32 on the model's device:
    `ema = d·ema + (1 - d)·w` after every step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, t in model.state_dict().items():
            self.shadow[name].mul_(self.decay).add_(t.detach().float(), alpha=1.0 - self.decay)

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.shadow[name].to(t.dtype) for name, t in like.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


# --------------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` atomically (temporary file + os.replace): a crash leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(state, f)


def load_checkpoint(path) -> dict:
    """Read a trainer checkpoint with `weights_only=True` (no code runs on load). SetupError for a
    missing file or a file that is not a checkpoint of this format and version."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"checkpoint {str(path)!r} does not exist: pass --resume the checkpoint.pt of an "
                         f"earlier run (in its --out-dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds (UnpicklingError, RuntimeError, EOFError ...)
        raise SetupError(f"checkpoint {str(path)!r} cannot be read as a trainer checkpoint "
                         f"({type(e).__name__}: {e}); it may be truncated or not a checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SetupError(f"{str(path)!r} is not a trainer checkpoint (format tag missing)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise SetupError(f"checkpoint {str(path)!r} has version {state.get('version')}, this code reads "
                         f"version {CHECKPOINT_VERSION}")
    return state


def check_resume_compatible(state: dict, model_config: CrawlerConfig, data: TrainData, path) -> list[str]:
    """SetupError unless the checkpoint's model architecture and data/tokenizer match this run's.
    Returns warnings for fields that may differ (batch size, sequence length)."""
    saved = CrawlerConfig.from_dict(json.loads(state["model_config"])).to_dict()
    now = model_config.to_dict()
    arch_diff = {k: (saved[k], now[k]) for k in now if k not in _NON_ARCH_FIELDS and saved[k] != now[k]}
    if arch_diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in
                           ((k, *v) for k, v in sorted(arch_diff.items())))
        raise SetupError(f"cannot resume {str(path)!r}: its model config differs ({detail}); rerun with the "
                         f"same --preset and model options as the run that wrote it")
    if state["data"] != data.identity:
        diff = sorted(k for k in data.identity if state["data"].get(k) != data.identity[k])
        raise SetupError(f"cannot resume {str(path)!r}: it was trained on other data or another tokenizer "
                         f"(differs in: {', '.join(diff)}); rerun with the same --data-dir and --tokenizer")
    return [f"resume: {k} was {saved[k]!r}, now {now[k]!r}" for k in _NON_ARCH_FIELDS if saved[k] != now[k]]


def load_final_model(path, *, ops: str = "auto", map_location="cpu") -> CrawlerGPT:
    """A CrawlerGPT from a `final_model.pt` written by `train` (weights_only load)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FINAL_MODEL_FORMAT:
        raise ValueError(f"{str(path)!r} is not a final_model.pt written by crawler.trainer")
    model = CrawlerGPT(CrawlerConfig.from_dict(json.loads(state["model_config"])), ops=ops)
    model.load_state_dict(state["model"], strict=True)
    return model


# --------------------------------------------------------------------------------------------------
# The loop

@dataclass
class TrainResult:
    """`model`: the trained CrawlerGPT (SWA/EMA weights loaded, QAT off, eval mode, on the training
    device); `summary`: what summary.json holds; `data`: the TrainData it was trained and scored on."""
    model: CrawlerGPT
    summary: dict
    data: TrainData


class _Trainer:
    def __init__(self, model_config, tc, data, out_dir, ops, ctx, log):
        self.mc, self.tc, self.data, self.ctx, self.log = model_config, tc, data, ctx, log
        self.out_dir = out_dir
        self.device = ctx.device
        self.seq_len = model_config.train_seq_len
        self.grad_accum = resolve_grad_accum(tc, ctx.world_size)
        self.local_tokens = check_batch_shape(model_config.train_batch_tokens, self.seq_len, ctx.world_size,
                                              self.grad_accum)
        self.max_wallclock_ms = 1000.0 * tc.max_wallclock_seconds if tc.max_wallclock_seconds > 0 else None

        torch.manual_seed(tc.seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(tc.seed)
        self.model = CrawlerGPT(model_config, ops=ops).to(self.device)
        self.model.set_qat(tc.qat)
        self.optimizers = build_optimizers(
            self.model, matrix_lr=tc.matrix_lr, tied_embed_lr=tc.tied_embed_lr, scalar_lr=tc.scalar_lr,
            muon_momentum=tc.muon_momentum, muon_backend_steps=tc.muon_backend_steps,
            muon_weight_decay=tc.muon_weight_decay, adam_weight_decay=tc.adam_weight_decay,
            adam_betas=(tc.adam_beta1, tc.adam_beta2), adam_eps=tc.adam_eps,
            muon_row_normalize=tc.muon_row_normalize, muon_polar_express=tc.muon_polar_express,
            muon_dtype=getattr(torch, tc.muon_dtype))
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.loader = DistributedTokenLoader(data.data_dir, rank=ctx.rank, world_size=ctx.world_size)
        self.swa = WeightAverager()
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema else None
        self.step, self.train_time_ms = 0, 0.0
        self.history = {"train_loss": [], "val": []}

        use_compile = tc.compile if tc.compile is not None else self.device.type == "cuda"
        module = torch.compile(self.model, dynamic=False, fullgraph=True) if use_compile else self.model
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DDP(module, device_ids=ids, broadcast_buffers=False)
        self.module, self.compiled = module, use_compile

    # -- state ---------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model_config": self.mc.to_json(), "train_config": dataclasses.asdict(self.tc),
                "data": self.data.identity, "world_size": self.ctx.world_size,
                "step": self.step, "train_time_ms": self.train_time_ms,
                "model": self.model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "swa": self.swa.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "loader": self.loader.state_dict(), "rng": rng, "history": self.history}

    def restore(self, state: dict, path) -> None:
        for warning in check_resume_compatible(state, self.mc, self.data, path):
            self.log(warning)
        if state["world_size"] != self.ctx.world_size:
            self.log(f"resume: checkpoint was written with world size {state['world_size']}, now "
                     f"{self.ctx.world_size}; the data order differs from an uninterrupted run")
        saved_tc = state["train_config"]
        changed = sorted(k for k, v in dataclasses.asdict(self.tc).items() if saved_tc.get(k) != v)
        if changed:
            self.log("resume: training options changed: " +
                     ", ".join(f"{k} {saved_tc.get(k)!r} -> {getattr(self.tc, k)!r}" for k in changed))
        self.model.load_state_dict(state["model"], strict=True)
        for opt, sd in zip(self.optimizers, state["optimizers"]):
            # load_state_dict also restores the saved hyper-parameters; this run's options win.
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(sd)
            for group, hyper in zip(opt.param_groups, current):
                group.update(hyper)
        self.swa.load_state_dict(state["swa"])
        if self.ema is not None:
            if state["ema"] is None:
                self.log("resume: EMA was off in the checkpoint; starting it from the current weights")
            else:
                self.ema.load_state_dict(state["ema"])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as e:
            raise SetupError(f"cannot resume {str(path)!r}: {e}") from None
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.train_time_ms = int(state["step"]), float(state["train_time_ms"])
        self.history = state["history"]
        self.log(f"resume: continuing {str(path)!r} at step {self.step}, train_time {self.train_time_ms:.0f}ms")

    # -- one optimiser step ----------------------------------------------------------------------
    def train_step(self, step: int, multiplier: float) -> torch.Tensor:
        """One optimiser step at LR multiplier `multiplier`; returns the mean micro-batch loss (0-d,
        this rank's, not synchronised)."""
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.loader.next_batch(self.local_tokens, self.seq_len)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-batch (no_sync covers forward + backward).
            sync = (self.module.no_sync() if self.ctx.distributed and micro < self.grad_accum - 1
                    else contextlib.nullcontext())
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    loss = self.module(x, y)
                (loss / self.grad_accum).backward()
            total += loss.detach()
        tc = self.tc
        momentum = muon_momentum_at(step, start=tc.muon_momentum_warmup_start, end=tc.muon_momentum,
                                    warmup_steps=tc.muon_momentum_warmup_steps)
        for group in self.optimizers[0].param_groups:
            group["momentum"] = momentum
        set_lr_multiplier(self.optimizers, multiplier)
        if tc.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        return total / self.grad_accum

    def compile_warmup(self) -> None:
        """Run `warmup_steps` steps so compilation (and autotuning) happens before the clock starts,
        then put model, optimisers and loader back as they were."""
        if self.tc.warmup_steps <= 0:
            return
        t0 = time.perf_counter()
        model_state = copy.deepcopy(self.model.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        loader_state = self.loader.state_dict()
        for i in range(self.tc.warmup_steps):
            self.train_step(self.step + i, 1.0)
        self.model.load_state_dict(model_state, strict=True)
        for opt, sd in zip(self.optimizers, opt_states):
            opt.load_state_dict(sd)
        self.loader.load_state_dict(loader_state)
        self._sync()
        self.log(f"warmup: {self.tc.warmup_steps} compile warm-up steps in {time.perf_counter() - t0:.1f}s "
                 f"(state restored)")

    # -- helpers ---------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _agree_max(self, value: float) -> float:
        """The maximum of `value` over ranks (every rank then takes the same time-based decisions)."""
        if not self.ctx.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _mean_over_ranks(self, t: torch.Tensor) -> float:
        if self.ctx.distributed:
            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.ctx.world_size
        return float(t.item())

    def evaluate(self) -> tuple[float, float]:
        """(val_loss, val_bpb) of the current weights, QAT off, on all ranks."""
        self.model.set_qat(False)
        try:
            return val_bpb(self.model, self.data.val_tokens, self.data.luts, seq_len=self.seq_len,
                           batch_seqs=self.tc.val_batch_seqs)
        finally:
            self.model.set_qat(self.tc.qat)

    def _step_line(self, step: int, rest: str, time_ms: float) -> str:
        """A parameter-golf log line; step_avg = training time (no validation, no warm-up) per step."""
        return f"step:{step}/{self.tc.iterations} {rest} train_time:{time_ms:.0f}ms step_avg:{time_ms / max(step, 1):.2f}ms"

    def _progress_line(self, step: int, time_ms: float) -> str:
        """Progress: steps and budget used, tokens/s of this session, ETA of the training budget."""
        done, session_ms = step - self.start_step, time_ms - self.start_time_ms
        tok_s = done * self.mc.train_batch_tokens / max(session_ms, 1e-9) * 1000.0
        eta = (self.tc.iterations - step) * session_ms / max(done, 1) / 1000.0
        budget = f"step {step}/{self.tc.iterations}"
        if self.max_wallclock_ms:
            eta = min(eta, max(self.max_wallclock_ms - time_ms, 0.0) / 1000.0)
            budget += f", {time_ms / self.max_wallclock_ms:.0%} of {self.max_wallclock_ms / 1000:.0f}s"
        return (f"progress: {budget} | {tok_s:,.0f} tok/s | train {_fmt_seconds(time_ms / 1000.0)} | "
                f"ETA {_fmt_seconds(eta)}")

    def _save(self, path: Path) -> None:
        if self.ctx.is_main and self.out_dir is not None:
            save_checkpoint(path, self.checkpoint_state())

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        tc, log = self.tc, self.log
        self.start_step, self.start_time_ms = self.step, self.train_time_ms
        self.compile_warmup()
        stop_after: int | None = None
        ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir is not None else None
        self.module.train()
        self._sync()
        t0 = time.perf_counter()
        multiplier = lr_multiplier(self.step, self.train_time_ms, iterations=tc.iterations,
                                   max_wallclock_ms=self.max_wallclock_ms, warmdown_frac=tc.warmdown_frac)
        while True:
            step = self.step
            last = step >= tc.iterations or (stop_after is not None and step >= stop_after)
            validated = any(v["step"] == step for v in self.history["val"])
            periodic = tc.val_every > 0 and step % tc.val_every == 0
            if (last or periodic or (step == 0 and tc.val_at_start)) and not validated:
                self._sync()
                self.train_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, bpb = self.evaluate()
                self.history["val"].append({"step": step, "val_loss": val_loss, "val_bpb": bpb,
                                            "train_time_ms": self.train_time_ms})
                log(self._step_line(step, f"val_loss:{val_loss:.4f} val_bpb:{bpb:.4f}", self.train_time_ms))
                self._sync()
                t0 = time.perf_counter()
            if last:
                break

            loss = self.train_step(step, multiplier)
            self.step = step = step + 1
            if self.ema is not None:
                self.ema.update(self.model)
            # SWA uses the multiplier this step ran at, as the seed does.
            if tc.swa and multiplier < tc.swa_start_mult and step % tc.swa_every == 0:
                self.swa.collect(self.model)

            elapsed = self._agree_max(self.train_time_ms + 1000.0 * (time.perf_counter() - t0))
            multiplier = lr_multiplier(step, elapsed, iterations=tc.iterations,
                                       max_wallclock_ms=self.max_wallclock_ms, warmdown_frac=tc.warmdown_frac)
            if stop_after is None and self.max_wallclock_ms is not None and elapsed >= self.max_wallclock_ms:
                stop_after = step
            if tc.log_every > 0 and (step <= 10 or step % tc.log_every == 0 or stop_after == step):
                mean_loss = self._mean_over_ranks(loss)
                self.history["train_loss"].append([step, mean_loss])
                log(self._step_line(step, f"train_loss:{mean_loss:.4f}", elapsed))
                if step % tc.log_every == 0 or stop_after == step:
                    log(self._progress_line(step, elapsed))
            if ckpt_path is not None and tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0:
                self._sync()
                self.train_time_ms += 1000.0 * (time.perf_counter() - t0)
                self._save(ckpt_path)
                t0 = time.perf_counter()
        if ckpt_path is not None:
            self._save(ckpt_path)
        return self._finish()

    def _finish(self) -> dict:
        tc, log = self.tc, self.log
        last_val = self.history["val"][-1]
        averaged = None
        if self.ema is not None:
            self.model.load_state_dict(self.ema.average(self.model.state_dict()), strict=True)
            averaged = "ema"
        elif tc.swa and self.swa.count > 0:
            self.model.load_state_dict(self.swa.average(self.model.state_dict()), strict=True)
            averaged = f"swa ({self.swa.count} snapshots)"
        final_loss, final_bpb = last_val["val_loss"], last_val["val_bpb"]
        if averaged is not None:
            t0 = time.perf_counter()
            final_loss, final_bpb = self.evaluate()
            log(f"{averaged.split()[0]}: averaged weights val_loss:{final_loss:.4f} val_bpb:{final_bpb:.4f} "
                f"({averaged}; eval {time.perf_counter() - t0:.1f}s)")
        self.model.set_qat(False)
        self.model.eval()
        steps_run = self.step - self.start_step
        run_ms = self.train_time_ms - self.start_time_ms
        first_val = self.history["val"][0]
        summary = {
            "model_config": self.mc.to_dict(), "train_config": dataclasses.asdict(tc),
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "world_size": self.ctx.world_size, "grad_accum_steps": self.grad_accum,
            "device": str(self.device), "compiled": self.compiled,
            "steps": self.step, "steps_this_session": steps_run, "resumed_from_step": self.start_step,
            "train_time_ms": self.train_time_ms,
            "step_avg_ms": self.train_time_ms / self.step if self.step else None,   # as in the log lines
            "tokens_per_s": steps_run * self.mc.train_batch_tokens / (run_ms / 1000.0) if run_ms > 0 else None,
            "train_tokens": self.step * self.mc.train_batch_tokens,
            "initial_val_bpb": first_val["val_bpb"] if first_val["step"] == 0 else None,
            "last_step_val_loss": last_val["val_loss"], "last_step_val_bpb": last_val["val_bpb"],
            "averaging": averaged, "final_val_loss": final_loss, "final_val_bpb": final_bpb,
            "val_tokens": int(self.data.val_tokens.numel()), "history": self.history,
        }
        if self.ctx.is_main and self.out_dir is not None:
            with atomic_open(self.out_dir / "final_model.pt") as f:
                torch.save({"format": FINAL_MODEL_FORMAT, "model_config": self.mc.to_json(),
                            "model": self.model.state_dict()}, f)
            write_summary(self.out_dir / "summary.json", summary)
        return summary


def write_summary(path: Path, summary: dict) -> None:
    """Write a run summary as JSON (atomically)."""
    def default(o):
        if isinstance(o, (np.generic,)):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")
    with atomic_open(path) as f:
        f.write(json.dumps(summary, indent=2, default=default).encode())


def train(model_config: CrawlerConfig, tc: TrainConfig, data: TrainData, *, out_dir=None, ops: str = "auto",
          resume=None, ctx: DistContext | None = None, log=None) -> TrainResult:
    """Train a CrawlerGPT of `model_config` with `tc` on `data` (from `prepare_data`).

    `out_dir` (created) receives train.log, checkpoint.pt (every `checkpoint_every` steps and at the
    end), final_model.pt (the averaged weights) and summary.json; None writes nothing. `resume` is a
    checkpoint path to continue from (SetupError if its model config or data differ). `ctx` defaults to
    the current process group (or a single process). Runs on every rank of a torchrun job.
    Returns a TrainResult whose model is ready for evaluation/quantisation.
    """
    tc.validate()
    ctx = ctx or _current_context()
    try:
        model_config.check_tokenizer(data.tokenizer_vocab_size)
    except ValueError as e:
        raise SetupError(str(e)) from None
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None and ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = log or RunLogger(out_dir, enabled=ctx.is_main)
    state = load_checkpoint(resume) if resume is not None else None
    trainer = _Trainer(model_config, tc, data, out_dir, ops, ctx, log)
    if state is not None:
        trainer.restore(state, resume)
        del state
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log(f"model: {n_params:,} parameters, {model_config.num_positions} schedule positions, ops "
        f"{trainer.model.resolve_ops(ctx.device)}, device {ctx.device}, world {ctx.world_size}, "
        f"grad_accum {trainer.grad_accum}, batch {model_config.train_batch_tokens} tokens "
        f"(seq {trainer.seq_len}), compile {trainer.compiled}")
    summary = trainer.run()
    return TrainResult(model=trainer.model, summary=summary, data=data)
