"""python -m crawler.quantize: quantise a checkpoint to an int6 artifact (docs/math.md §3) and report its
size against the 16,000,000-byte budget; with --eval also the val_bpb before and after.

    python -m crawler.quantize --checkpoint C --out A [--plan default|seed|rtn_seed_floor] [--loop-aware]
        [--data-dir D] [--target-bytes N] ...   (--help lists everything)

The work is crawler.quant's (plan, Hessians, GPTQ driver, pruning, pipeline); this module reads the
command line and the checkpoint (crawler.checkpoint: trainer files and plain state dicts such as
PR #1579's) and prints the JSON summary. Exit status 0 when the artifact fits the budget, 1 when not,
2 with one `error:` line for a bad option or file (crawler.cli.run_main); every option, the checkpoint
(its checksum), the data and the output paths are checked before quantising. --out's directory is locked
while the command runs (crawler.fileio.hold_directory_lock): a second process writing there is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .budget import BUDGET_BYTES, size_report
from .checkpoint import model_from_checkpoint, read_checkpoint
from .cli import int_at_least, run_main, shared_options
from .config import PASSTHROUGH_NUMEL
from .data import load_eval_data
from .errors import SetupError
from .fileio import check_writable_file, hold_directory_lock, write_json
from .quant import DEFAULT_N_SEQS, PLANS, ROLES, Calibration, RoleSpec, build_artifact, get_plan, quantize_and_evaluate
from .runtime import resolve_data, resolve_device, resolve_ops
from .tokenizer import load_tokenizer, tokenizer_identity


def _parse_role(text: str) -> tuple[str, RoleSpec]:
    """"ROLE=METHOD[:BITS[:K[:FLOOR]]]", e.g. "tok_emb=gptq:8:20" or "block=rtn:6:12.85:inv_range"."""
    try:
        role, rest = text.split("=", 1)
        method, *more = rest.split(":")
        casts = {"bits": int, "k": float, "floor": str}
        if len(more) > len(casts):
            raise ValueError("too many fields")
        # the fields left out keep RoleSpec's defaults
        spec = RoleSpec(method, **{name: casts[name](v) for name, v in zip(casts, more) if v})
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROLE=METHOD[:BITS[:K[:FLOOR]]] ({e})") from None
    return role, spec


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crawler.quantize", parents=[shared_options()], description=(
        "Quantise a CrawlerGPT checkpoint to an int6 artifact (GPTQ + SDClip, docs/math.md §3) and report "
        "its size against the 16,000,000-byte budget; with --eval also the val_bpb before and after."))
    q = ap.add_argument_group("quantisation")
    q.add_argument("--checkpoint", required=True, help="trainer checkpoint or plain state dict (torch.save)")
    q.add_argument("--out", required=True, help="artifact file to write")
    q.add_argument("--preset", help="config preset for a checkpoint without a config (pr1579, tiny)")
    q.add_argument("--plan", default="default", choices=sorted(PLANS),
                   help="quantisation plan: default (ours), seed (PR #1579's), rtn_seed_floor (baseline)")
    q.add_argument("--role", action="append", default=[], type=_parse_role, metavar="ROLE=METHOD[:BITS[:K[:FLOOR]]]",
                   help=f"override one role of the plan, e.g. tok_emb=gptq:8:20 (METHOD gptq|rtn, FLOOR "
                        f"eps|inv_range); roles: {', '.join(ROLES)}")
    q.add_argument("--small-numel", type=int_at_least(0), default=PASSTHROUGH_NUMEL,
                   help="tensors with at most this many elements pass through as fp16")
    q.add_argument("--loop-aware", action="store_true", help="two-phase loop-aware GPTQ (PR #1535)")
    q.add_argument("--target-bytes", type=int_at_least(1), default=BUDGET_BYTES,
                   help="prune ±1 codes until artifact + code bytes fit this (decimal bytes)")
    q.add_argument("--n-seqs", type=int_at_least(1), default=DEFAULT_N_SEQS, help="calibration sequences")
    q.add_argument("--seq-len", type=int_at_least(1), help="calibration/eval sequence length (default: config's)")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q.add_argument("--batch-seqs", type=int_at_least(1), default=8, help="sequences per forward pass")
    q.add_argument("--eval", action="store_true", help="also measure val_bpb before and after quantisation")
    q.add_argument("--json", help="write the summary as JSON here")
    return ap


def main(argv=None) -> int:
    """The CLI; returns 0 when the artifact fits the budget, 1 when it does not, 2 for a bad option or
    file (one `error:` line)."""
    args = build_parser().parse_args(argv)
    return run_main("python -m crawler.quantize", lambda: quantize(args))


def quantize(args: argparse.Namespace) -> int:
    """The command's work for parsed `args`: everything checked first, then quantise, write, report."""
    try:
        plan = dataclasses.replace(get_plan(args.plan), small_numel=args.small_numel)
        for role, spec in args.role:
            plan = plan.with_role(role, spec)
    except ValueError as e:
        raise SetupError(f"{e} (options --plan, --role)") from None
    code = size_report(0).code_bytes
    if args.target_bytes <= code:
        raise SetupError(f"--target-bytes {args.target_bytes:,} leaves no room for the artifact: the counted code "
                         f"alone is {code:,} B")
    check_writable_file(args.out, "--out")
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise SetupError(f"--out {args.out!r} is the --checkpoint itself: the artifact would replace the weights "
                         f"it is made from; choose another --out")
    if args.json:
        check_writable_file(args.json, "--json")
    # --out's directory is held until the artifact is written: no other quantisation or run writes there.
    with hold_directory_lock(Path(args.out).parent, "--out"):
        return _quantize_checked(args, plan)


def _quantize_checked(args: argparse.Namespace, plan) -> int:
    """quantize() once the options and output paths are checked: read, quantise, write, report."""
    device = resolve_device(args.device)
    resolve_ops(args.ops, device)
    ckpt = read_checkpoint(args.checkpoint, preset=args.preset)
    model = model_from_checkpoint(ckpt, device=device, ops=args.ops)
    config = model.config
    seq_len = args.seq_len or config.train_seq_len
    data_dir = tokenizer = None
    if plan.needs_hessians() or args.eval:
        data_dir, tokenizer = resolve_data(args.data_dir, args.tokenizer, config.vocab_size, need_tokenizer=args.eval)
    # The artifact records the tokenizer the weights were trained with: the checkpoint's, else the one given.
    trained_with = ckpt.tokenizer
    if trained_with is None and tokenizer is not None:
        trained_with = tokenizer_identity(tokenizer, load_tokenizer(tokenizer))
    if args.eval:
        val_tokens, luts = load_eval_data(data_dir, tokenizer, config.vocab_size, trained_with=ckpt.tokenizer,
                                          allow_mismatch=args.allow_tokenizer_mismatch)
        if val_tokens.numel() < seq_len + 1:
            raise SetupError(f"--eval: the validation shards of {str(data_dir)!r} hold {val_tokens.numel()} "
                             f"tokens, fewer than one window of --seq-len {seq_len} + 1")
        summary = quantize_and_evaluate(model, data_dir, luts, val_tokens, plan=plan, loop_aware=args.loop_aware,
                                        out_path=args.out, target_bytes=args.target_bytes, n_seqs=args.n_seqs,
                                        calib_seq_len=seq_len, eval_seq_len=seq_len, seed=args.seed,
                                        batch_seqs=args.batch_seqs, tokenizer=trained_with)
    else:
        calib = (Calibration.from_data(model, data_dir, n_seqs=args.n_seqs, seq_len=seq_len, seed=args.seed,
                                       batch_seqs=args.batch_seqs, log=print) if plan.needs_hessians() else None)
        _, summary = build_artifact(model, calib, plan=plan, loop_aware=args.loop_aware,
                                    target_bytes=args.target_bytes, out_path=args.out, batch_seqs=args.batch_seqs,
                                    tokenizer=trained_with)
    if args.json:
        write_json(args.json, summary)
    print(json.dumps(summary, indent=2))
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
