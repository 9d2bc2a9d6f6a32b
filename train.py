#!/usr/bin/env python3
"""Train a crawler transformer (PR #1579's "3f+2cx2"), then report.

With no arguments on a machine without a GPU: builds the built-in corpus (stdlib documentation, cached)
if needed, trains the `tiny` preset for a few minutes on the CPU and prints a summary table with the
trained model's val_bpb next to the untrained model's and a unigram baseline's.
With --data-dir/--tokenizer: trains on parameter-golf FineWeb shards (preset pr1579 on a GPU).
`torchrun --nproc_per_node=N train.py ...` runs data-parallel (NCCL on GPU, gloo on CPU).

Stages (each a function below; all logic lives in crawler/): data -> baselines -> train -> summary.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow every op down
# many times over. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from crawler.config import PRESETS, CrawlerConfig
from crawler.data import build_builtin_corpus
from crawler.evaluate import unigram_bpb
from crawler.model import OPS_CHOICES
from crawler.trainer import (SetupError, TrainConfig, default_cpu_threads, env_world_size, prepare_data,
                             resolve_grad_accum, setup_distributed, teardown_distributed, train, write_summary)

# The built-in corpus demo: a few minutes on a CPU. Everything not listed keeps the seed's default.
# Measured on this demo: twice the seed's learning rates beat 1x by 0.07 bpb and 3-4x by 0.03 bpb (60
# steps of 4096 tokens); SWA is off because in a 4-minute run its snapshots span too much of the LR
# decay (10 snapshots: 2.266 bpb vs 2.246 for the last weights).
DEMO_TRAIN_DEFAULTS = dict(max_wallclock_seconds=240.0, grad_accum_steps=1, val_every=0, log_every=25,
                           checkpoint_every=50, swa=False, matrix_lr=0.04, tied_embed_lr=0.04, scalar_lr=0.02)
# No compiler to warm up on the CPU; fp32 Newton-Schulz (bf16 matmuls are slow on most CPUs).
CPU_TRAIN_DEFAULTS = dict(warmup_steps=0, compile=False, muon_dtype="float32")
UNIGRAM_MAX_TRAIN_TOKENS = 100_000_000   # counts for the unigram baseline: the first ~shard of FineWeb


def _as_flags(options: dict) -> str:
    def flag(key, value):
        name = key.replace("_", "-")
        if isinstance(value, bool):
            return f"--{name}" if value else f"--no-{name}"
        return f"--{name} {value}"
    return " ".join(flag(k, v) for k, v in options.items())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Built-in corpus demo defaults (no --data-dir): {_as_flags(DEMO_TRAIN_DEFAULTS)}; on a CPU "
               f"also {_as_flags(CPU_TRAIN_DEFAULTS)}. Explicit options always win.")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="model preset (default: pr1579 on a GPU with --data-dir, else tiny)")
    run.add_argument("--out-dir", default=None,
                     help="directory for train.log, checkpoint.pt, final_model.pt, summary.json "
                          "(default: the --resume checkpoint's directory, else runs/<preset>-<time>)")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue a run from its checkpoint.pt (same preset, model options and data)")
    run.add_argument("--ops", choices=OPS_CHOICES, default="auto",
                     help="model ops: Triton kernels, plain-PyTorch references, or auto (Triton on CUDA)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="training device (auto: CUDA when available)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU intra-op threads (default: the cores not busy by the load average, >= 1)")
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="directory of FineWeb shards fineweb_{train,val}_*.bin (default: the built-in corpus)")
    data.add_argument("--tokenizer", default=None,
                      help="SentencePiece .model the shards were encoded with (default: <data-dir>/tokenizer.model)")
    data.add_argument("--cache-dir", default=None,
                      help="where the built-in corpus is cached (default: $CRAWLER_CACHE or "
                           "~/.cache/crawler-kernels/corpus)")
    data.add_argument("--val-max-tokens", type=int, default=None,
                      help="score only the first N validation tokens (default: all)")
    data.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                      help="also score a unigram baseline (train-split frequencies, add-one smoothing) "
                           "(default: on for the built-in corpus)")
    model = p.add_argument_group("model and batch (override the preset)")
    model.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (>= the tokenizer's)")
    model.add_argument("--train-seq-len", type=int, default=None, help="training sequence length T")
    model.add_argument("--train-batch-tokens", type=int, default=None,
                       help="tokens per optimiser step over all ranks and micro-batches; a multiple of "
                            "world_size x grad_accum_steps x T")
    model.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                       help="any other CrawlerConfig field (JSON value), e.g. --model-set model_dim=192 "
                            "--model-set xsa='\"pr1579\"'; repeatable. Fields: " +
                            ", ".join(f.name for f in dataclasses.fields(CrawlerConfig)))
    TrainConfig.add_arguments(p)
    return p


def _model_config(args) -> CrawlerConfig:
    overrides = {}
    for item in args.model_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SetupError(f"--model-set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    for key in ("vocab_size", "train_seq_len", "train_batch_tokens"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        return CrawlerConfig.preset(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise SetupError(f"{e} (check --preset / --model-set / --vocab-size options)") from None


def _rank0_first(ctx, fn):
    """Run `fn` on rank 0, then on the other ranks (so a cache is built once)."""
    if ctx.is_main:
        out = fn()
    if ctx.distributed:
        dist.barrier()
    if not ctx.is_main:
        out = fn()
    return out


def _broadcast(ctx, value):
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stage_data(args, ctx, model_config):
    """The data directory and tokenizer (building the built-in corpus if needed), checked and loaded."""
    if args.data_dir is None:
        if args.tokenizer is not None:
            raise SetupError("--tokenizer without --data-dir: give both (FineWeb shards and their tokenizer), "
                             "or neither (built-in corpus)")
        log = print if ctx.is_main else (lambda msg: None)
        info = _rank0_first(ctx, lambda: build_builtin_corpus(args.cache_dir, model_config.vocab_size, log=log))
        data_dir, tokenizer = info.data_dir, info.tokenizer_path
    else:
        data_dir = Path(args.data_dir)
        tokenizer = Path(args.tokenizer) if args.tokenizer else data_dir / "tokenizer.model"
        if args.tokenizer is None and not tokenizer.is_file():
            raise SetupError(f"no --tokenizer given and {str(tokenizer)!r} does not exist: pass --tokenizer "
                             f"with the SentencePiece .model the shards of {str(data_dir)!r} were encoded with")
    return prepare_data(data_dir, tokenizer, model_config.vocab_size, val_max_tokens=args.val_max_tokens)


def stage_baselines(data, model_config) -> dict:
    """The unigram baseline's val_loss / val_bpb on the validation tokens the model is scored on."""
    counts = data.train_token_counts(model_config.vocab_size, UNIGRAM_MAX_TRAIN_TOKENS)
    loss, bpb = unigram_bpb(counts, data.val_tokens, data.luts, seq_len=model_config.train_seq_len)
    return {"unigram_val_loss": loss, "unigram_val_bpb": bpb}


def print_summary_table(rows: list[tuple[str, str]], log=print) -> None:
    width = max(len(k) for k, _ in rows)
    log("=" * (width + 30))
    for key, value in rows:
        log(f"{key:<{width}}  {value}")
    log("=" * (width + 30))


def _fmt(x, spec=".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def run(args) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda but no CUDA device is available: use --device cpu (or auto)")
    builtin = args.data_dir is None
    if args.preset is None:
        args.preset = "pr1579" if device == "cuda" and not builtin else "tiny"
    model_config = _model_config(args)
    defaults = {**(DEMO_TRAIN_DEFAULTS if builtin else {}), **(CPU_TRAIN_DEFAULTS if device == "cpu" else {})}
    try:
        tc = TrainConfig(**{**defaults, **TrainConfig.overrides(args)})
        tc.validate()
    except TypeError as e:
        raise SetupError(str(e)) from None
    resolve_grad_accum(tc, env_world_size())   # before any process group waits on a bad world size
    if args.baselines is None:
        args.baselines = builtin

    if device == "cpu":
        torch.set_num_threads(args.threads or default_cpu_threads())
    ctx = setup_distributed(device)
    try:
        t_start = time.perf_counter()
        data = stage_data(args, ctx, model_config)
        stamp = _broadcast(ctx, time.strftime("%Y%m%d-%H%M%S"))
        out_dir = Path(args.out_dir) if args.out_dir else (
            Path(args.resume).parent if args.resume else Path("runs") / f"{args.preset}-{stamp}")
        report = {"stages_s": {"data": time.perf_counter() - t_start}}
        if args.baselines and ctx.is_main:
            report.update(stage_baselines(data, model_config))

        t0 = time.perf_counter()
        try:
            result = train(model_config, tc, data, out_dir=out_dir, ops=args.ops, resume=args.resume, ctx=ctx)
        except KeyboardInterrupt:
            ckpt = out_dir / "checkpoint.pt"
            if ctx.is_main:
                hint = (f"continue with: python train.py --resume {ckpt} (and the same options)"
                        if ckpt.is_file() else "no checkpoint was written yet (see --checkpoint-every)")
                print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise SystemExit(130) from None
        report["stages_s"]["train"] = time.perf_counter() - t0
        # Later stages (quantise -> artifact -> int6 evaluation) take result.model and add to `report`.

        summary = {**result.summary, **report, "out_dir": str(out_dir)}
        if ctx.is_main:
            s = result.summary
            rows = [("preset / parameters", f"{args.preset} / {s['n_params']:,}"),
                    ("steps", f"{s['steps']} ({s['steps_this_session']} this session)"),
                    ("train time", f"{s['train_time_ms'] / 1000:.1f} s"),
                    ("step_avg", f"{_fmt(s['step_avg_ms'], '.2f')} ms"),
                    ("tokens/s (this session)", _fmt(s["tokens_per_s"], ",.0f")),
                    ("val tokens scored", f"{s['val_tokens']:,}")]
            if "unigram_val_bpb" in report:
                rows.append(("unigram baseline val_bpb", _fmt(report["unigram_val_bpb"])))
            rows += [("untrained val_bpb", _fmt(s["initial_val_bpb"])),
                     ("last-step val_bpb", _fmt(s["last_step_val_bpb"])),
                     (f"pre-quant val_bpb ({s['averaging'] or 'raw weights'})", _fmt(s["final_val_bpb"])),
                     ("out dir", str(out_dir))]
            print_summary_table(rows)
            write_summary(out_dir / "summary.json", summary)
        return summary
    finally:
        teardown_distributed()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SetupError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
