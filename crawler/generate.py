"""Sample text from an int6 artifact: python -m crawler.generate --artifact A --prompt "..." [options].

The model computes on the artifact's packed codes (crawler.inference.load_int6_model) and decodes with a
KV cache. The prompt is encoded as [BOS] + SentencePiece ids (how documents are stored); decoding stops
at the next BOS (the start of another document) unless --no-stop. The text goes to stdout, timings to
stderr. `--help` lists every option.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .cli import shared_options
from .config import CrawlerConfig
from .inference import generate, load_int6_model
from .runtime import resolve_data, resolve_device
from .tokenizer import BOS_ID, check_vocab, load_tokenizer


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crawler.generate", parents=[shared_options()], description=(
        "Generate text with an int6 artifact, computing on its packed weights (docs/math.md §5) with a KV "
        "cache. The prompt is encoded with --tokenizer (default: the tokenizer of --data-dir, or of the "
        "built-in corpus at the model's vocab size)."))
    ap.add_argument("--artifact", required=True, help="artifact file written by crawler.quantize")
    ap.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. a new document)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    ap.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all "
                                                          "(default 50)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--no-stop", action="store_true", help="keep generating past a BOS (end of document)")
    return ap


def main(argv=None) -> int:
    """The CLI; returns the exit status (2 with a one-line `error: ...` for bad files or arguments)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        ap.error("--max-new-tokens, --temperature and --top-k must be >= 0")

    try:
        t0 = time.perf_counter()
        device = resolve_device(args.device)
        model = load_int6_model(args.artifact, device=device, ops=args.ops)
        config: CrawlerConfig = model.config
        tokenizer = args.tokenizer
        if tokenizer is None:          # the prompt needs a tokenizer only, not the shards
            tokenizer = resolve_data(args.data_dir, None, config.vocab_size, log=_log)[1]
        sp = load_tokenizer(tokenizer)
        check_vocab(sp, config.vocab_size)
    except (OSError, ValueError) as e:       # missing / corrupt / mismatched files: ArtifactError is a ValueError
        _log(f"error: {e}")
        return 2
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
