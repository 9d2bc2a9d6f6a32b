"""Legal score-first test-time training (docs/math.md §6): the validation stream is cut into chunks;
each chunk's sliding windows are scored before the model trains on that chunk, so no score depends on
an update that saw its target. Scoring reuses crawler.bpb; the sums are all-reduced across ranks."""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .bpb import all_reduce_sums, bpb_from_sums, check_stream, luts_on, plan_windows, score_windows
from .cli import int_at_least
from .documents import document_segments
from .runtime import Progress, autocast, eval_mode, rank_and_world, to_device

TTT_FREEZE_BLOCKS = 1       # the seed's TTT_FREEZE_BLOCKS: flat block 0 and crawler block 0 stay fixed


def frozen_block_prefixes(n_blocks: int) -> tuple[str, ...]:
    """The parameter-name prefixes of the first `n_blocks` flat and crawler blocks, which TTT keeps
    fixed (the seed's TTT_FREEZE_BLOCKS=n)."""
    return (tuple(f"flat_blocks.{i}." for i in range(n_blocks)) +
            tuple(f"crawler_blocks.{i}." for i in range(n_blocks)))


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """Hyper-parameters of legal score-first TTT; the defaults are PR #1579's.

    chunk_tokens: targets per chunk; epochs: passes over each chunk's training sequences; lr: peak SGD
    learning rate, cosine-decayed over chunks as lr·½(1 + cos(π c/(C−1))); momentum: SGD momentum;
    batch_seqs: sequences of seq_len per optimiser step (global, split across ranks); grad_clip: global
    gradient-norm clip; frozen_prefixes: parameters whose names start with one of these stay fixed.
    A cheaper budget (CPU runs) is a caller's choice, e.g. fewer epochs or smaller chunks.
    """
    chunk_tokens: int = 32_768
    epochs: int = 3
    lr: float = 0.002
    momentum: float = 0.9
    batch_seqs: int = 32
    grad_clip: float = 1.0
    frozen_prefixes: tuple[str, ...] = frozen_block_prefixes(TTT_FREEZE_BLOCKS)

    def __post_init__(self):
        for name, low in (("chunk_tokens", 1), ("epochs", 0), ("batch_seqs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"TTTConfig: {name} must be an int >= {low}, got {value!r}")
        if not self.lr >= 0:
            raise ValueError(f"TTTConfig: lr must be >= 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TTTConfig: momentum must be in [0, 1), got {self.momentum!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"TTTConfig: grad_clip must be > 0, got {self.grad_clip!r}")
        if isinstance(self.frozen_prefixes, str):
            raise TypeError("TTTConfig: frozen_prefixes must be a tuple of str, not a str")

    def check(self, seq_len: int) -> None:
        """ValueError unless these settings can run with windows of `seq_len` (each chunk must hold a
        training sequence); the command lines call it before any work, legal_ttt_bpb again."""
        if self.chunk_tokens < seq_len:
            raise ValueError(f"TTTConfig.chunk_tokens ({self.chunk_tokens}) must be >= seq_len ({seq_len}) so "
                             f"each chunk holds at least one training sequence")


_TTT_FLAGS = (   # (TTTConfig field, flag, type, what it sets)
    ("chunk_tokens", "--ttt-chunk-tokens", int_at_least(1), "targets per chunk"),
    ("epochs", "--ttt-epochs", int_at_least(0), "passes over each chunk's sequences"),
    ("lr", "--ttt-lr", float, "peak SGD learning rate (cosine-decayed over the chunks)"),
    ("momentum", "--ttt-momentum", float, "SGD momentum"),
    ("batch_seqs", "--ttt-batch-seqs", int_at_least(1), "sequences per SGD step (global, split across ranks)"),
    ("grad_clip", "--ttt-grad-clip", float, "global gradient-norm clip"),
)


def add_ttt_arguments(parser: argparse.ArgumentParser, *, epochs_default: str | None = None) -> None:
    """The legal-TTT flags (the seed's TTT_* knobs), one per TTTConfig field plus --ttt-freeze-blocks, in
    a group "legal score-first TTT"; each defaults to None (= the seed's value, TTTConfig's default).
    `epochs_default` replaces the stated default of --ttt-epochs (a caller that picks its own)."""
    d = TTTConfig()
    group = parser.add_argument_group("legal score-first TTT (defaults: the seed's)")
    for name, flag, kind, what in _TTT_FLAGS:
        default = epochs_default if name == "epochs" and epochs_default else getattr(d, name)
        group.add_argument(flag, type=kind, default=None, help=f"TTT {what} (default: {default})")
    group.add_argument("--ttt-freeze-blocks", type=int_at_least(0), default=None,
                       help=f"TTT keeps flat blocks 0..N-1 and crawler blocks 0..N-1 fixed (default: "
                            f"{TTT_FREEZE_BLOCKS})")


def ttt_config_from_args(args: argparse.Namespace, **defaults) -> TTTConfig:
    """The TTTConfig of the flags of `add_ttt_arguments` given in `args`; fields not given take
    `defaults` (e.g. epochs=1), else TTTConfig's. ValueError for an invalid value."""
    fields = {**defaults}
    for name, flag, _, _ in _TTT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            fields[name] = value
    if args.ttt_freeze_blocks is not None:
        if args.ttt_freeze_blocks < 0:
            raise ValueError(f"--ttt-freeze-blocks must be >= 0, got {args.ttt_freeze_blocks}")
        fields["frozen_prefixes"] = frozen_block_prefixes(args.ttt_freeze_blocks)
    return TTTConfig(**fields)


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks in one fp32 buffer (a rank without data in a batch
    contributes zeros). Every rank ends with identical gradients on every parameter."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def _train_chunk(model, tokens: torch.Tensor, start: int, end: int, *, seq_len: int, config: TTTConfig,
                 optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], doc_isolated: bool) -> None:
    """TTT on the chunk's targets [start, end): cut into floor((end − start)/seq_len) non-overlapping
    sequences (inputs tokens[start + i·T : start + (i+1)·T], targets shifted by one; the remainder of
    fewer than seq_len targets is not trained on, as in the seed), `config.epochs` passes in batches of
    `config.batch_seqs` sequences. A batch is split across ranks; each rank weights its mean loss by its
    share of the batch and the gradients are summed, so the step equals the single-process one. With
    `doc_isolated` the sequences are cut at their BOS tokens, as in doc-isolated training."""
    n_seqs = (end - start) // seq_len
    if n_seqs == 0:
        return
    rank, world = rank_and_world()
    device = params[0].device
    chunk_cpu = tokens[start:start + n_seqs * seq_len + 1].to(torch.int64)     # the stream lives on the CPU
    chunk = to_device(chunk_cpu, device)
    x_all, y_all = chunk[:-1].view(n_seqs, seq_len), chunk[1:].view(n_seqs, seq_len)
    # The sequences' document segments come from the CPU copy (moved to the device with Documents.to): from
    # ids on a GPU they would be read back to the host, a device sync per batch.
    x_cpu = chunk_cpu[:-1].view(n_seqs, seq_len)
    for _ in range(config.epochs):
        for b0 in range(0, n_seqs, config.batch_seqs):
            b1 = min(b0 + config.batch_seqs, n_seqs)
            lo, hi = b0 + (b1 - b0) * rank // world, b0 + (b1 - b0) * (rank + 1) // world
            optimizer.zero_grad(set_to_none=True)
            if hi > lo:
                x, y = x_all[lo:hi], y_all[lo:hi]
                with autocast(device):
                    if doc_isolated:
                        loss = model(x, y, document_segments(x_cpu[lo:hi]).to(device))
                    else:
                        loss = model(x, y)
                (loss * ((hi - lo) / (b1 - b0))).backward()
            if world > 1:
                _all_reduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()


def legal_ttt_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, stride: int = 64, batch_seqs: int = 32,
                  config: TTTConfig | None = None, log: Callable[[str], None] | None = print,
                  doc_isolated: bool = False) -> tuple[float, float]:
    """Legal score-first TTT (docs/math.md §6) on `model` (the dequantised int6 artifact): (val_loss, val_bpb).

    The N = len(tokens) − 1 targets are cut into C = ceil(N / chunk_tokens) chunks; each sliding window
    (`plan_windows(N, seq_len, stride)`) belongs to the chunk of its first scored target. For c = 0..C−1:
    score chunk c's windows under no_grad (split across ranks, `batch_seqs` per forward), then, unless c
    is the last chunk, train on chunk c's targets (`_train_chunk`) with SGD at lr·½(1 + cos(π c/(C−1))).
    A window only scores targets at or after its first one, and chunk c trains only on targets in chunk
    c after all of chunk c's windows were scored, so no score depends on an update that saw its target.

    Trainable: every parameter whose name does not start with a `config.frozen_prefixes` entry, alpha
    (`crawler_residual_scales`) included; QAT is off (crawler.runtime.eval_mode). The model is adapted IN
    PLACE (its weights are the TTT-adapted ones afterwards); requires_grad flags, QAT flags and
    train/eval mode are restored. Pass
    the plain model, not a DDP/compile wrapper (the frozen names would not match: a ValueError).
    Progress per chunk goes to `log` on rank 0 (None: silent). With `doc_isolated`, scoring and training
    never attend or embed across a BOS (crawler.documents); chunks, windows and scored targets are unchanged.
    """
    config = config if config is not None else TTTConfig()
    n_targets = check_stream(tokens, seq_len)
    config.check(seq_len)
    windows = plan_windows(n_targets, seq_len, stride)
    K = config.chunk_tokens
    n_chunks = -(-n_targets // K)
    chunk_of = ((windows[:, 0] + windows[:, 2]) // K).clamp_(max=n_chunks - 1)
    bounds = [0] + torch.bincount(chunk_of, minlength=n_chunks).cumsum(0).tolist()
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    luts = luts_on(luts, device)

    named = list(model.named_parameters())
    frozen = {name for name, _ in named if name.startswith(tuple(config.frozen_prefixes))}
    if config.frozen_prefixes and not frozen:
        raise ValueError(f"TTT: no parameter name starts with any of {config.frozen_prefixes} "
                         f"(pass the unwrapped model, not a DDP/torch.compile wrapper)")
    params = [p for name, p in named if name not in frozen]
    saved_flags = [(p, p.requires_grad) for _, p in named]
    n_train = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for name, p in named if name in frozen)
    if log is not None and rank == 0:
        log(f"ttt: {n_chunks} chunks of {K} targets, {windows.shape[0]} windows (T={seq_len}, stride {stride}), "
            f"epochs {config.epochs}, lr {config.lr}, trainable {n_train:,} / frozen {n_frozen:,} params"
            f"{', documents isolated' if doc_isolated else ''}")
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    with eval_mode(model), Progress(n_chunks, "ttt", unit="chunk", log=log if rank == 0 else None) as progress:
        try:
            for name, p in named:
                p.requires_grad_(name not in frozen)
            optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum) if params else None
            for c in range(n_chunks):
                mine = windows[bounds[c]:bounds[c + 1]]
                mine = mine[mine.shape[0] * rank // world: mine.shape[0] * (rank + 1) // world]
                model.eval()
                with torch.no_grad():
                    score_windows(model, tokens, luts, mine, seq_len=seq_len, batch_seqs=batch_seqs, sums=sums,
                                  doc_isolated=doc_isolated)
                lr_c = config.lr * 0.5 * (1.0 + math.cos(math.pi * c / (n_chunks - 1))) if n_chunks > 1 else 0.0
                if c < n_chunks - 1 and config.epochs > 0 and optimizer is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_c
                    model.train()
                    _train_chunk(model, tokens, c * K, min((c + 1) * K, n_targets), seq_len=seq_len,
                                 config=config, optimizer=optimizer, params=params, doc_isolated=doc_isolated)
                totals = all_reduce_sums(sums.clone()).tolist()
                elapsed = time.perf_counter() - t0
                progress.write(f"ttt chunk {c + 1}/{n_chunks} lr:{lr_c:.3e} "
                               f"val_bpb_so_far:{bpb_from_sums(*totals)[1]:.4f} elapsed:{elapsed:.1f}s "
                               f"eta:{elapsed / (c + 1) * (n_chunks - c - 1):.1f}s")
                progress.update()
        finally:
            for p, flag in saved_flags:
                p.requires_grad_(flag)
    return bpb_from_sums(*totals)
