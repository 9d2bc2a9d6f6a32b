"""Sample text from an int6 artifact: python -m crawler.generate --artifact A --prompt "..." [options].

The model computes on the artifact's packed codes (crawler.inference.load_int6_model) and decodes with a
KV cache (on CUDA, each new token's step replayed from a CUDA graph: crawler.decoding.Decoder). A
--max-new-tokens the model's positions or the device's memory cannot hold is refused before anything is
allocated. The prompt is encoded as [BOS] + SentencePiece ids (how documents are stored); decoding stops
at the next BOS (the start of another document) unless --no-stop. The text goes to stdout, timings to
stderr. `--help` lists every option. The tokenizer is checked against the one the artifact records; bad
options and files end in one `error:` line, exit status 2 (crawler.cli.run_main).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from .artifact import load_artifact
from .cli import int_at_least, run_main, shared_options
from .config import CrawlerConfig
from .decoding import generate
from .errors import UnverifiedWarning
from .inference import load_int6_model
from .runtime import resolve_data, resolve_device, resolve_ops
from .tokenizer import BOS_ID, load_checked_tokenizer


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crawler.generate", parents=[shared_options()], description=(
        "Generate text with an int6 artifact, computing on its packed weights (docs/math.md §5) with a KV "
        "cache. The prompt is encoded with --tokenizer (default: the tokenizer of --data-dir, or of the "
        "built-in corpus at the model's vocab size)."))
    ap.add_argument("--artifact", required=True, help="artifact file written by crawler.quantize")
    ap.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. a new document)")
    ap.add_argument("--max-new-tokens", type=int_at_least(0), default=64,
                    help="tokens to generate at most (default 64)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    ap.add_argument("--top-k", type=int_at_least(0), default=50,
                    help="sample among the k most likely tokens; 0 = all (default 50)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--no-stop", action="store_true", help="keep generating past a BOS (end of document)")
    return ap


def main(argv=None) -> int:
    """The CLI; returns the exit status (2 with a one-line `error: ...` for bad files or arguments)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.temperature >= 0:
        ap.error(f"argument --temperature: expected a number >= 0 (0 = greedy), got {args.temperature}")
    return run_main("python -m crawler.generate", lambda: sample(args))


def sample(args: argparse.Namespace) -> int:
    """The command's work for parsed `args`: load and check the artifact and tokenizer, generate, print."""
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    resolve_ops(args.ops, device)
    artifact = load_artifact(args.artifact)
    model = load_int6_model(artifact, device=device, ops=args.ops)
    config: CrawlerConfig = model.config
    tokenizer = args.tokenizer
    if tokenizer is None:          # the prompt needs a tokenizer only, not the shards
        tokenizer = resolve_data(args.data_dir, None, config.vocab_size, log=_log)[1]
    if artifact.tokenizer is None:
        warnings.warn(f"artifact {args.artifact!r} records no tokenizer identity: {str(tokenizer)!r} cannot be "
                      f"checked against the one it was trained with", UnverifiedWarning, stacklevel=2)
    sp, _ = load_checked_tokenizer(tokenizer, config.vocab_size, trained_with=artifact.tokenizer,
                                   allow_mismatch=args.allow_tokenizer_mismatch)
    _log(f"loaded {args.artifact} ({sum(b.numel() * b.element_size() for b in model.buffers()):,} B of codes "
         f"and scales) on {device} in {time.perf_counter() - t0:.2f}s")

    prompt = [BOS_ID] + sp.encode(args.prompt)
    t0 = time.perf_counter()
    ids = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                   seed=args.seed, eos_id=None if args.no_stop else BOS_ID, vocab_limit=sp.vocab_size())
    if ids.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    # decode prompt and continuation together: a piece's leading "▁" is only a space after other text
    print(sp.decode([t for t in ids.tolist() if t != BOS_ID]), flush=True)
    n = ids.numel() - len(prompt)
    _log(f"generated {n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s, prompt of {len(prompt)} included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
