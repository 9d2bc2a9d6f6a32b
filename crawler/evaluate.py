"""Validation bits per byte (docs/math.md §6) of a model: non-overlapping windows (`val_bpb`), the
stride-64 sliding window (`sliding_window_bpb`) and a unigram baseline, all with float64 sums
all-reduced across ranks; legal score-first TTT is crawler.ttt, the shared pieces crawler.bpb.

`python -m crawler.evaluate --artifact A --mode {plain,sliding,ttt}` scores an int6 artifact on its own:
plain and sliding compute on the packed int6 weights (crawler.inference), TTT trains the dequantised
model. torchrun splits the work across ranks.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .artifact import model_from_artifact
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
from .cli import shared_options
from .data import load_eval_data
from .inference import load_int6_model
from .runtime import Progress, autocast, distributed, eval_mode, rank_and_world, resolve_data, resolve_device
from .ttt import TTTConfig, legal_ttt_bpb

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
            x = x_all[start: min(start + batch_seqs, hi)].to(device)
            y = y_all[start: min(start + batch_seqs, hi)].to(device)
            with autocast(device):
                nll = window_nll(model, x, y, doc_isolated=doc_isolated)
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
    d = TTTConfig()
    p = argparse.ArgumentParser(prog="python -m crawler.evaluate", parents=[shared_options()],
                                description="Score a crawler int6 artifact: non-overlapping (plain), sliding "
                                            "window, or legal score-first TTT (docs/math.md §6). torchrun "
                                            "splits the work across ranks.")
    e = p.add_argument_group("evaluation")
    e.add_argument("--artifact", required=True, help="artifact file written by crawler.quantize")
    e.add_argument("--mode", choices=MODES, default="sliding", help="evaluation (default: sliding)")
    e.add_argument("--seq-len", type=int, help="window length T (default: the artifact's train_seq_len)")
    e.add_argument("--stride", type=int, default=64, help="sliding-window stride (default 64)")
    e.add_argument("--batch-seqs", type=int, default=32, help="windows per forward pass (default 32)")
    e.add_argument("--max-val-tokens", type=int, help="score only the first N validation tokens")
    e.add_argument("--doc-isolated", action="store_true",
                   help="document isolation: no window attends or embeds across a BOS, TTT trains within "
                        "documents; the scored targets are unchanged (docs/evaluation.md)")
    e.add_argument("--dequantized", action="store_true",
                   help="score a dequantised float copy instead of computing on the packed int6 weights "
                        "(plain/sliding; TTT always trains the dequantised model)")
    e.add_argument("--ttt-epochs", type=int, default=d.epochs, help=f"TTT epochs per chunk (default {d.epochs})")
    e.add_argument("--ttt-chunk-tokens", type=int, default=d.chunk_tokens,
                   help=f"TTT chunk size in targets (default {d.chunk_tokens})")
    e.add_argument("--ttt-lr", type=float, default=d.lr, help=f"TTT peak SGD learning rate (default {d.lr})")
    e.add_argument("--ttt-batch-seqs", type=int, default=d.batch_seqs,
                   help=f"TTT sequences per step (default {d.batch_seqs})")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with a one-line `error: ...` for bad files or arguments)."""
    args = build_parser().parse_args(argv)
    # Scoring runs on the packed int6 weights (crawler.inference); TTT trains, so it needs the
    # dequantised float model.
    int6 = args.mode != "ttt" and not args.dequantized
    try:
        device = resolve_device(args.device)
        with distributed(device) as ctx:
            def log(msg: str) -> None:
                if ctx.is_main:
                    print(msg, flush=True)

            load = load_int6_model if int6 else model_from_artifact
            model = load(args.artifact, device=device, ops=args.ops)
            config = model.config
            seq_len = args.seq_len or config.train_seq_len
            data_dir, tokenizer = resolve_data(args.data_dir, args.tokenizer, config.vocab_size, log=log)
            tokens, luts = load_eval_data(data_dir, tokenizer, config.vocab_size, max_tokens=args.max_val_tokens)
            t0 = time.perf_counter()
            if args.mode == "plain":
                loss, bpb = val_bpb(model, tokens, luts, seq_len=seq_len, batch_seqs=args.batch_seqs,
                                    doc_isolated=args.doc_isolated)
            elif args.mode == "sliding":
                loss, bpb = sliding_window_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                               batch_seqs=args.batch_seqs, doc_isolated=args.doc_isolated)
            else:
                ttt = TTTConfig(chunk_tokens=args.ttt_chunk_tokens, epochs=args.ttt_epochs, lr=args.ttt_lr,
                                batch_seqs=args.ttt_batch_seqs)
                loss, bpb = legal_ttt_bpb(model, tokens, luts, seq_len=seq_len, stride=args.stride,
                                          batch_seqs=args.batch_seqs, config=ttt, log=log,
                                          doc_isolated=args.doc_isolated)
            elapsed = time.perf_counter() - t0
            log(f"mode:{args.mode} weights:{'int6' if int6 else 'dequantized'} val_loss:{loss:.4f} "
                f"val_bpb:{bpb:.4f} eval_time:{elapsed:.1f}s seq_len:{seq_len} stride:{args.stride} "
                f"val_tokens:{tokens.numel()} doc_isolated:{int(args.doc_isolated)}")
    except (FileNotFoundError, ValueError, TypeError) as e:   # ArtifactError and SetupError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
