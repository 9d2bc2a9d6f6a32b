"""The training hyper-parameters (docs/math.md §2): `TrainConfig` with the seed's recipe as defaults, one
command-line flag per field, and the batch arithmetic every rank must agree on (micro-batches per step,
tokens per micro-batch)."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

import torch

from ..cli import FloatRange
from ..config import PASSTHROUGH_NUMEL, QAT_BITS
from ..errors import SetupError
from ..runtime import resolve_ops
from .schedule import parse_switches

GLOBAL_BATCH_MICROSTEPS = 8      # the seed's grad_accum_steps = 8 // world_size
_NON_NEGATIVE = FloatRange()                           # learning rates, decays, clips, times: finite, >= 0
_FRACTION = FloatRange(0.0, 1.0, high_open=True)       # momenta and betas: [0, 1)


def _opt(default, help_text: str, choices=None, trajectory: bool = True, valid: FloatRange = _NON_NEGATIVE):
    """A TrainConfig field; `trajectory=False` marks one that changes what is logged or saved, never the
    weights (a resumed run may change it and stay bit-identical to the uninterrupted one). A float field's
    values are `valid` (default: finite and >= 0), checked when the flag is parsed and by `validate`."""
    return field(default=default, metadata={"help": help_text, "choices": choices, "trajectory": trajectory,
                                            "valid": valid})


@dataclass
class TrainConfig:
    """Every training hyper-parameter; the defaults are the seed's (PR #1579, docs/math.md §2) for a GPU run.
    Batch size and sequence length come from the model config (`train_batch_tokens`, `train_seq_len`)."""
    iterations: int = _opt(20000, "number of optimiser steps (the LR budget when no wall-clock cap)")
    max_wallclock_seconds: float = _opt(600.0, "stop training after this much training time; also the LR "
                                        "budget (0 = no cap, the iteration count is the budget)")
    warmdown_frac: float = _opt(0.6, "fraction of the budget at its end over which the LR decays linearly to 0",
                                valid=FloatRange(0.0, 1.0, low_open=True))
    warmdown_iters: int = _opt(0, "without a wall-clock cap: decay the LR linearly to 0 over the last N steps "
                               "instead of warmdown_frac of them (the seed's WARMDOWN_ITERS; 0 = warmdown_frac)")
    warmup_steps: int = _opt(100, "compile warm-up steps run before training; model, optimiser and loader "
                             "state are restored afterwards")
    grad_accum_steps: int = _opt(0, "micro-batches per step (0 = 8 // world_size, the seed's)")
    seed: int = _opt(1337, "random seed for the model initialisation")
    matrix_lr: float = _opt(0.02, "Muon learning rate (block matrices, bigram.proj, ve.proj)")
    tied_embed_lr: float = _opt(0.02, "AdamW learning rate of tok_emb, bigram.table, ve.table")
    scalar_lr: float = _opt(0.01, "AdamW learning rate of the scalar/vector parameters")
    muon_momentum: float = _opt(0.99, "Muon momentum after warm-up", valid=_FRACTION)
    muon_momentum_warmup_start: float = _opt(0.85, "Muon momentum at step 0", valid=_FRACTION)
    muon_momentum_warmup_steps: int = _opt(500, "steps of the linear Muon momentum warm-up")
    muon_backend_steps: int = _opt(5, "Newton-Schulz iterations")
    muon_weight_decay: float = _opt(0.085, "Muon decoupled weight decay (p *= 1 - lr*wd after the update)")
    muon_row_normalize: bool = _opt(False, "MuonEq-R: normalise the rows of the update before Newton-Schulz")
    muon_polar_express: bool = _opt(False, "Polar-Express Newton-Schulz coefficients instead of the fixed ones")
    muon_dtype: str = _opt("bfloat16", "Newton-Schulz dtype: bfloat16 (the seed's) or float32 (CPUs without "
                           "bf16 matmul units run bf16 ~20x slower)", choices=("bfloat16", "float32"))
    adam_weight_decay: float = _opt(0.085, "AdamW weight decay (both AdamW groups)")
    adam_beta1: float = _opt(0.9, "AdamW beta1", valid=_FRACTION)
    adam_beta2: float = _opt(0.95, "AdamW beta2", valid=_FRACTION)
    adam_eps: float = _opt(1e-8, "AdamW epsilon", valid=FloatRange(low_open=True))
    grad_clip_norm: float = _opt(0.3, "global gradient-norm clip (0 = off)")
    qat: bool = _opt(True, "QAT: fake-quantise (straight-through) every Linear with more than qat_small_numel "
                     "weights while training")
    qat_small_numel: int = _opt(PASSTHROUGH_NUMEL, "QAT leaves Linears with at most this many weights alone; also "
                                "the default of the quantiser's --quant-small-numel")
    qat_bits: int = _opt(QAT_BITS, "QAT grid width in bits (the seed's QAT_BITS)")
    qat_mlp_bits: int = _opt(0, "QAT grid width of the MLP matrices (mlp.fc, mlp.proj); 0 = qat_bits (the seed's "
                             "QAT_MLP_BITS)")
    late_qat_threshold: float = _opt(1.0, "late QAT: switch QAT on once the LR multiplier is <= this (1.0 = from "
                                     "step 0; the seed's LATE_QAT_THRESHOLD)")
    progressive_schedule: str = _opt("", "progressive crawler loops 'STEP:LOOPS,...': start with 1 loop and run "
                                     "LOOPS loops from step STEP on, e.g. '2000:2' (the seed's "
                                     "PROGRESSIVE_SCHEDULE; empty = all loops from step 0)")
    swa: bool = _opt(True, "SWA: average snapshots taken every swa_every steps while the LR multiplier < "
                     "swa_start_mult, loaded at the end")
    swa_every: int = _opt(50, "steps between SWA snapshots")
    swa_start_mult: float = _opt(0.2, "SWA collects while the LR multiplier is below this")
    ema: bool = _opt(False, "EMA of the weights (replaces SWA at the end when on)")
    ema_decay: float = _opt(0.997, "EMA decay per step", valid=FloatRange(0.0, 1.0, low_open=True, high_open=True))
    val_every: int = _opt(1000, "validate every N steps (0 = only at the end)", trajectory=False)
    val_at_start: bool = _opt(True, "validate the untrained model at step 0", trajectory=False)
    val_batch_seqs: int = _opt(32, "validation sequences per forward pass per rank", trajectory=False)
    log_every: int = _opt(200, "train-loss log line every N steps (and the first 10 steps)", trajectory=False)
    checkpoint_every: int = _opt(0, "write the resumable checkpoint every N steps (0 = only at the end)",
                                 trajectory=False)
    compile: bool | None = _opt(None, "torch.compile the model (default: on CUDA only)")
    doc_isolated: bool = _opt(False, "document isolation: attention and the embedding never cross a BOS "
                              "(training, validation and the artifact's evaluations; docs/evaluation.md)")

    def validate(self) -> None:
        """Raise SetupError naming the field and what is expected."""
        def need(cond, msg):
            if not cond:
                raise SetupError(f"TrainConfig: {msg}")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if hints[f.name] is float:      # the check its flag made when parsed, for values from elsewhere
                problem = f.metadata["valid"].problem(getattr(self, f.name))
                need(problem is None, f"{f.name}: {problem}")
        for name in ("iterations", "swa_every", "val_batch_seqs", "muon_backend_steps"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "grad_accum_steps", "val_every", "log_every", "checkpoint_every",
                     "muon_momentum_warmup_steps", "warmdown_iters", "qat_small_numel", "qat_mlp_bits"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(not (self.warmdown_iters and self.max_wallclock_seconds),
             f"warmdown_iters ({self.warmdown_iters}) applies only without a wall-clock cap: pass "
             f"--max-wallclock-seconds 0 with it, or use --warmdown-frac under a cap")
        need(2 <= self.qat_bits <= 8, f"qat_bits must be in [2, 8], got {self.qat_bits}")
        need(self.qat_mlp_bits == 0 or 2 <= self.qat_mlp_bits <= 8,
             f"qat_mlp_bits must be 0 (= qat_bits) or in [2, 8], got {self.qat_mlp_bits}")
        parse_switches(self.progressive_schedule)
        need(self.muon_dtype in ("bfloat16", "float32"),
             f"muon_dtype must be 'bfloat16' or 'float32', got {self.muon_dtype!r}")

    def compiles(self, device, ops="auto") -> bool:
        """Whether a run on `device` with `ops` compiles the model: `compile` as given, by default on CUDA
        only. SetupError for document isolation compiled with the reference ops (the only ones off CUDA):
        their varlen attention reads each batch's segment bounds on the host and loops over them, which
        torch.compile cannot capture as one graph (reported in issue 26: a CPU run had not finished
        compiling after 240 s, where the same run without --doc-isolated took 81 s)."""
        compiles = self.compile if self.compile is not None else torch.device(device).type == "cuda"
        if compiles and self.doc_isolated and resolve_ops(ops, device) == "reference":
            raise SetupError(f"--doc-isolated --compile on {torch.device(device)} with the reference ops: "
                             f"document-isolated attention compiles only with the Triton kernels on CUDA (the "
                             f"reference reads each batch's segment bounds on the host, which torch.compile cannot "
                             f"capture); drop --compile (the default off CUDA) or train on a GPU")
        return compiles

    @classmethod
    def add_arguments(cls, parser) -> None:
        """One `--flag-name` per field (booleans get `--x/--no-x`, floats are range-checked when parsed),
        help text and default shown, all defaulting to None (= not given) so `overrides()` returns only what
        the user set."""
        hints = typing.get_type_hints(cls)
        group = parser.add_argument_group("training hyper-parameters (defaults: the seed's recipe; the "
                                          "built-in corpus demo changes a few, see above)")
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            help_text = f.metadata["help"]
            if f.default is not None:
                help_text += f" (default: {f.default})"
            flag = "--" + f.name.replace("_", "-")
            if kind in (bool, bool | None):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif f.metadata["choices"]:
                group.add_argument(flag, choices=f.metadata["choices"], default=None, help=help_text)
            elif kind is float:
                group.add_argument(flag, type=f.metadata["valid"], default=None, metavar="FLOAT",
                                   help=f"{help_text}; {f.metadata['valid']}")
            else:
                group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=help_text)

    @classmethod
    def trajectory_fields(cls) -> frozenset[str]:
        """The fields whose change changes the trained weights (all but logging, validation and
        checkpoint cadence)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["trajectory"])

    @classmethod
    def overrides(cls, namespace) -> dict:
        """The fields given on the command line (not None) in an argparse namespace from add_arguments."""
        return {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)
                if getattr(namespace, f.name, None) is not None}


def resolve_grad_accum(tc: TrainConfig, world_size: int) -> int:
    """`tc.grad_accum_steps`, or 8 // world_size (docs/math.md §2); SetupError if world_size does not divide 8."""
    if tc.grad_accum_steps:
        return tc.grad_accum_steps
    if world_size < 1 or GLOBAL_BATCH_MICROSTEPS % world_size:
        raise SetupError(f"world size {world_size} does not divide {GLOBAL_BATCH_MICROSTEPS}: the seed's "
                         f"recipe runs 8 // world_size micro-batches per step. Launch 1, 2, 4 or 8 "
                         f"processes, or set --grad-accum-steps explicitly")
    return GLOBAL_BATCH_MICROSTEPS // world_size


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
