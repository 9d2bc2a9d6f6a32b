"""python -m crawler.quantize: quantise a checkpoint to an int6 artifact (docs/math.md §3) and report its
size against the 16,000,000-byte budget; with --eval also the val_bpb before and after.

    python -m crawler.quantize --checkpoint C --out A [--plan default|seed|rtn_seed_floor] [--loop-aware]
        [--data-dir D] [--target-bytes N] ...   (--help lists everything)

The work is crawler.quant's (plan, Hessians, GPTQ driver, pruning, pipeline); this module reads the
command line and the checkpoint (crawler.checkpoint: trainer files and plain state dicts such as
PR #1579's) and prints the JSON summary. Exit status 0 when the artifact fits the budget, 1 when not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .budget import BUDGET_BYTES
from .checkpoint import model_from_checkpoint
from .cli import shared_options
from .config import PASSTHROUGH_NUMEL
from .data import load_eval_data
from .fileio import write_json
from .quant import DEFAULT_N_SEQS, PLANS, ROLES, Calibration, RoleSpec, build_artifact, get_plan, quantize_and_evaluate
from .runtime import resolve_data, resolve_device


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
    q.add_argument("--small-numel", type=int, default=PASSTHROUGH_NUMEL,
                   help="tensors with at most this many elements pass through as fp16")
    q.add_argument("--loop-aware", action="store_true", help="two-phase loop-aware GPTQ (PR #1535)")
    q.add_argument("--target-bytes", type=int, default=BUDGET_BYTES,
                   help="prune ±1 codes until artifact + code bytes fit this (decimal bytes)")
    q.add_argument("--n-seqs", type=int, default=DEFAULT_N_SEQS, help="calibration sequences")
    q.add_argument("--seq-len", type=int, help="calibration/eval sequence length (default: config's)")
    q.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    q.add_argument("--batch-seqs", type=int, default=8, help="sequences per forward pass")
    q.add_argument("--eval", action="store_true", help="also measure val_bpb before and after quantisation")
    q.add_argument("--json", help="write the summary as JSON here")
    return ap


def main(argv=None) -> int:
    """The CLI; returns 0 when the artifact fits the budget, 1 when it does not."""
    args = build_parser().parse_args(argv)
    plan = dataclasses.replace(get_plan(args.plan), small_numel=args.small_numel)
    for role, spec in args.role:
        plan = plan.with_role(role, spec)
    model = model_from_checkpoint(args.checkpoint, preset=args.preset, device=resolve_device(args.device),
                                  ops=args.ops)
    config = model.config
    seq_len = args.seq_len or config.train_seq_len
    data_dir = tokenizer = None
    if plan.needs_hessians() or args.eval:
        data_dir, tokenizer = resolve_data(args.data_dir, args.tokenizer, config.vocab_size, need_tokenizer=args.eval)
    if args.eval:
        val_tokens, luts = load_eval_data(data_dir, tokenizer, config.vocab_size)
        summary = quantize_and_evaluate(model, data_dir, luts, val_tokens, plan=plan, loop_aware=args.loop_aware,
                                        out_path=args.out, target_bytes=args.target_bytes, n_seqs=args.n_seqs,
                                        calib_seq_len=seq_len, eval_seq_len=seq_len, seed=args.seed,
                                        batch_seqs=args.batch_seqs)
    else:
        calib = (Calibration.from_data(model, data_dir, n_seqs=args.n_seqs, seq_len=seq_len, seed=args.seed,
                                       batch_seqs=args.batch_seqs, log=print) if plan.needs_hessians() else None)
        _, summary = build_artifact(model, calib, plan=plan, loop_aware=args.loop_aware,
                                    target_bytes=args.target_bytes, out_path=args.out, batch_seqs=args.batch_seqs)
    if args.json:
        write_json(args.json, summary)
    print(json.dumps(summary, indent=2))
    return 0 if summary["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
