"""Validation bits per byte (docs/math.md §6) of a model: non-overlapping windows (`val_bpb`), the
stride-64 sliding window (`sliding_window_bpb`) and a unigram baseline, all with float64 sums
all-reduced across ranks; legal score-first TTT is crawler.ttt, the shared pieces crawler.bpb.

`python -m crawler.evaluate --artifact A --mode {plain,sliding,ttt}` scores an int6 artifact on its own:
plain and sliding compute on the packed int6 weights (crawler.inference), TTT trains the dequantised
model. torchrun splits the work across ranks. Every option is checked before scoring, the tokenizer
against the one the artifact records, and the result line is followed by the artifact's size against
the 16 MB budget; bad options and files end in one `error:` line, exit status 2 (crawler.cli.run_main).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from .artifact import load_artifact, model_from_artifact
from .bpb import (
    all_reduce_sums,
    bpb_from_sums,
    check_stream,
    luts_on,
    plan_windows,
    score_windows,
    target_bytes,
    window_nll,
)
from .cli import int_at_least, run_main, shared_options
from .data import load_eval_data
from .errors import SetupError, UnverifiedWarning
from .runtime import (
    Progress,
    autocast,
    distributed,
    eval_mode,
    rank_and_world,
    reproducible,
    resolve_data,
    resolve_device,
    resolve_ops,
    to_device,
)
from .ttt import TTTConfig, add_ttt_arguments, legal_ttt_bpb, ttt_config_from_args

MODES = ("plain", "sliding", "ttt")


def unigram_bpb(train_counts: torch.Tensor, tokens: torch.Tensor, luts, *, seq_len: int) -> tuple[float, float]:
    """A context-free baseline: (val_loss, val_bpb) of the add-one-smoothed unigram distribution
    `p(t) = (count_t + 1) / (Σ count + V)` of `train_counts` (V,), scored on exactly the targets
    `val_bpb` scores (tokens truncated to whole windows of seq_len), with the same byte LUTs.
    A trained model must beat it."""
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"tokens: need at least seq_len + 1 = {seq_len + 1} validation tokens, got "
                         f"{tokens.numel()}")
    usable = tokens[: n_windows * seq_len + 1].long()
    x, y = usable[:-1], usable[1:]
    if int(y.max()) >= train_counts.numel():
        raise ValueError(f"train_counts: has {train_counts.numel()} entries but the tokens reach id {int(y.max())}")
    counts = train_counts.double()
    log_p = torch.log((counts + 1.0) / (counts.sum() + counts.numel()))
    return bpb_from_sums(float(-log_p[y].sum()), float(y.numel()), float(target_bytes(x, y, luts).sum()))


@torch.no_grad()
def val_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, batch_seqs: int = 8,
            doc_isolated: bool = False) -> tuple[float, float]:
    """Non-overlapping validation: (val_loss in nats/token, val_bpb).

    tokens (N,) int token stream (BOS-separated documents); it is truncated to a multiple of seq_len
    (+1 for the shifted targets) and cut into windows of seq_len. Windows are split across ranks when
    torch.distributed is initialised; the float64 sums are all-reduced. `model.token_nll(x, y)` gives
    per-token nats; with `doc_isolated` every window is cut at its BOS tokens (crawler.bpb.window_nll).
    Runs in crawler.runtime's eval_mode (QAT off) and restores the previous mode.
    """
    n_windows = (tokens.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"tokens: need at least seq_len + 1 = {seq_len + 1} validation tokens, got "
                         f"{tokens.numel()}")
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    usable = tokens[: n_windows * seq_len + 1].long()
    x_all = usable[:-1].view(n_windows, seq_len)
    y_all = usable[1:].view(n_windows, seq_len)
    lo, hi = n_windows * rank // world, n_windows * (rank + 1) // world
    sums = torch.zeros(3, dtype=torch.float64, device=device)   # nats, tokens, bytes
    with eval_mode(model), Progress(hi - lo, "val_bpb", unit="window") as progress:
        for start in range(lo, hi, batch_seqs):
            x_cpu = x_all[start: min(start + batch_seqs, hi)]
            x, y = to_device(x_cpu, device), to_device(y_all[start: min(start + batch_seqs, hi)], device)
            with autocast(device):
                nll = window_nll(model, x, y, doc_isolated=doc_isolated, x_cpu=x_cpu)
            sums[0] += nll.double().sum()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts).sum()
            progress.update(x.shape[0])
    nats, count, nbytes = all_reduce_sums(sums).tolist()
    return bpb_from_sums(nats, count, nbytes)


@torch.no_grad()
def sliding_window_bpb(model, tokens: torch.Tensor, luts, *, seq_len: int, stride: int = 64,
                       batch_seqs: int = 32, doc_isolated: bool = False) -> tuple[float, float]:
    """Sliding-window validation (docs/math.md §6): (val_loss in nats/token, val_bpb).

    tokens (N + 1,) int token stream (uint16 is fine: each batch's span is cast to int64); windows from
    `plan_windows(N, seq_len, stride)`, every target scored exactly once. Windows run `batch_seqs` per
    forward and are split across ranks (contiguous ranges) when torch.distributed is initialised; the
    float64 sums (nats, targets, bytes) are all-reduced. `model.token_nll(x, y)` gives per-token nats
    (B, T); with `doc_isolated` a window never attends across a BOS (crawler.documents), the windows
    and the scored targets unchanged. Runs in crawler.runtime's eval_mode (QAT off) and restores the
    previous mode.
    """
    n_targets = check_stream(tokens, seq_len)
    windows = plan_windows(n_targets, seq_len, stride)
    rank, world = rank_and_world()
    n = windows.shape[0]
    mine = windows[n * rank // world: n * (rank + 1) // world]
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with eval_mode(model), Progress(mine.shape[0], "sliding window", unit="window") as progress:
        score_windows(model, tokens, luts_on(luts, device), mine, seq_len=seq_len, batch_seqs=batch_seqs,
                      sums=sums, progress=progress, doc_isolated=doc_isolated)
    return bpb_from_sums(*all_reduce_sums(sums).tolist())


# --------------------------------------------------------------------------------------------------
# Command line: score an artifact on its own

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crawler.evaluate", parents=[shared_options()],
                                description="Score a crawler int6 artifact: non-overlapping (plain), sliding "
                                            "window, or legal score-first TTT (docs/math.md §6). torchrun "
                                            "splits the work across ranks.")
    e = p.add_argument_group("evaluation")
    e.add_argument("--artifact", required=True, help="artifact file written by crawler.quantize")
    e.add_argument("--mode", choices=MODES, default="sliding", help="evaluation (default: sliding)")
    e.add_argument("--seq-len", type=int_at_least(1), help="window length T (default: the artifact's train_seq_len)")
    e.add_argument("--stride", type=int_at_least(1), default=64, help="sliding-window stride (default 64)")
    e.add_argument("--batch-seqs", type=int_at_least(1), default=32, help="windows per forward pass (default 32)")
    e.add_argument("--max-val-tokens", type=int, help="score only the first N validation tokens (>= T + 1)")
    e.add_argument("--doc-isolated", action="store_true",
                   help="document isolation: no window attends or embeds across a BOS, TTT trains within "
                        "documents; the scored targets are unchanged (docs/evaluation.md)")
    e.add_argument("--dequantized", action="store_true",
                   help="score a dequantised float copy instead of computing on the packed int6 weights "
                        "(plain/sliding; TTT always trains the dequantised model)")
    add_ttt_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with a one-line `error: ...` for bad files or arguments)."""
    args = build_parser().parse_args(argv)
    return run_main("python -m crawler.evaluate", lambda: evaluate(args))


def _check_windows(args, seq_len: int) -> TTTConfig | None:
    """SetupError unless the window options fit windows of `seq_len`; the TTT settings of --mode ttt."""
    if args.mode != "plain":
        try:
            plan_windows(1, seq_len, args.stride)
        except ValueError:
            raise SetupError(f"--stride {args.stride} must be in [1, --seq-len {seq_len}]") from None
    if args.mode != "ttt":
        return None
    try:
        ttt = ttt_config_from_args(args)
        ttt.check(seq_len)
    except ValueError as e:
        raise SetupError(f"{e} (the --ttt-* options)") from None
    return ttt


def evaluate(args: argparse.Namespace) -> int:
    """The command's work for parsed `args`: load and check the artifact, the options and the data, print
    the artifact's size against the budget, score, and print the result line (which repeats the budget
    verdict). Returns 0."""
    # Scoring runs on the packed int6 weights (crawler.inference); TTT trains, so it needs the
    # dequantised float model.
    int6 = args.mode != "ttt" and not args.dequantized
    device = resolve_device(args.device)
    resolve_ops(args.ops, device)
    with reproducible(device), distributed(device) as ctx:   # TTT trains: bitwise repeatable on a CPU
        def log(msg: str) -> None:
            if ctx.is_main:
                print(msg, flush=True)

        artifact = load_artifact(args.artifact)
        # int6 inference is this command's, not train.py's: imported here, it stays out of an export.
        from .inference import load_int6_model
        model = (load_int6_model if int6 else model_from_artifact)(artifact, device=device, ops=args.ops)
        config = model.config
        seq_len = args.seq_len or config.train_seq_len
        ttt = _check_windows(args, seq_len)
        if args.max_val_tokens is not None and args.max_val_tokens < seq_len + 1:
            raise SetupError(f"--max-val-tokens {args.max_val_tokens}: max_val_tokens must be >= one window, "
                             f"--seq-len {seq_len} + 1")
        data_dir, tokenizer = resolve_data(args.data_dir, args.tokenizer, config.vocab_size, log=log)
        if artifact.tokenizer is None:
            warnings.warn(f"artifact {args.artifact!r} records no tokenizer identity: {str(tokenizer)!r} cannot be "
                          f"checked against the one it was trained with", UnverifiedWarning, stacklevel=2)
        tokens, luts = load_eval_data(data_dir, tokenizer, config.vocab_size, max_tokens=args.max_val_tokens,
                                      trained_with=artifact.tokenizer, allow_mismatch=args.allow_tokenizer_mismatch,
                                      doc_isolated=args.doc_isolated)
        if tokens.numel() < seq_len + 1:
            raise SetupError(f"the validation shards of {str(data_dir)!r} hold {tokens.numel()} tokens, fewer than "
                             f"one window of --seq-len {seq_len} + 1")
        # The size report is not part of scoring: imported here, it stays out of the counted code.
        from .budget import size_report
        sizes = size_report(os.path.getsize(args.artifact))
        log(f"budget: {sizes.summary()}")
        t0 = time.perf_counter()
        if args.mode == "plain":
            loss, bpb = val_bpb(model, tokens, luts, seq_len=seq_len, batch_seqs=args.batch_seqs,
                              doc_isolated=args.doc_isolated)
        elif args.mode == "sliding":
            loss, bpb = sliding_window_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                           batch_seqs=args.batch_seqs, doc_isolated=args.doc_isolated)
        else:
            loss, bpb = legal_ttt_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                      batch_seqs=args.batch_seqs, config=ttt, log=log,
                                      doc_isolated=args.doc_isolated)
        elapsed = time.perf_counter() - t0
        log(f"mode:{args.mode} weights:{'int6' if int6 else 'dequantized'} val_loss:{loss:.4f} "
            f"val_bpb:{bpb:.4f} eval_time:{elapsed:.1f}s seq_len:{seq_len} stride:{args.stride} "
            f"val_tokens:{tokens.numel()} doc_isolated:{int(args.doc_isolated)} "
            f"budget:{'fits' if sizes.fits else 'OVER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
