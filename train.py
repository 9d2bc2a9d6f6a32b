#!/usr/bin/env python3
"""Train a crawler transformer (PR #1579's "3f+2cx2"), then report.

With no arguments on a machine without a GPU: builds the built-in corpus (stdlib documentation, cached)
if needed, trains the `tiny` preset for a few minutes on the CPU and prints a summary table with the
trained model's val_bpb next to the untrained model's and a unigram baseline's.
With --data-dir/--tokenizer: trains on parameter-golf FineWeb shards (preset pr1579 on a GPU).
`torchrun --nproc_per_node=N train.py ...` runs data-parallel (NCCL on GPU, gloo on CPU).

Then quantises the trained model to an int6 artifact (GPTQ + SDClip, brotli, checked against the 16 MB
budget), evaluates the artifact (non-overlapping, sliding window stride 64, legal score-first TTT), and,
for the built-in corpus demo, also measures the quantisation gap of the seed's plans for comparison.

Stages (each a function below; all logic lives in crawler/):
data -> baselines -> train -> quantise -> evaluate -> summary, every stage logging into out-dir/train.log.
`--resume` continues a run with the options it was started with (recorded in its checkpoint); options
given again on the command line win and are logged, those that change training named.

Every option, the data and the output directory are checked before the first stage, and every expected
failure (bad option, missing or damaged file, full disk) ends in one `train.py: error: ...` line and exit
status 2 (crawler.cli.run_main). An --out-dir that already holds a run is refused unless the run is
continued (--resume) or replaced (--overwrite), and one in use by another process (a lock held for the
whole run, crawler.fileio.hold_directory_lock) is refused. final_model.pt is written before the last
checkpoint.
"""
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared CPU spinning threads slow every op down
# many times over. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path

import torch

from crawler.artifact import model_from_artifact
from crawler.bpb import plan_windows
from crawler.budget import BUDGET_BYTES, size_report
from crawler.checkpoint import read_checkpoint
from crawler.cli import int_at_least, run_main, shared_options
from crawler.config import PRESETS, CrawlerConfig, parse_field
from crawler.errors import SetupError
from crawler.evaluate import sliding_window_bpb, unigram_bpb
from crawler.fileio import hold_directory_lock, prepare_output_dir, write_json
from crawler.quant import PLANS, Calibration, get_plan, quantize_and_evaluate
from crawler.report import print_table, summary_rows
from crawler.runtime import (
    broadcast_object,
    distributed,
    env_world_size,
    reproducible,
    resolve_cpu_threads,
    resolve_data,
    resolve_device,
    resolve_ops,
)
from crawler.training import TrainConfig, prepare_data, resolve_grad_accum, train
from crawler.training.log import RunLogger, exact_line, score_line
from crawler.training.resume import RUN_OPTIONS_KEY, given_options, restore_run_options
from crawler.ttt import TTTConfig, add_ttt_arguments, legal_ttt_bpb, ttt_config_from_args

# The built-in corpus demo: a few minutes on a CPU. Everything not listed keeps the seed's default.
# Measured on this demo: twice the seed's learning rates beat 1x by 0.07 bpb and 3-4x by 0.03 bpb (60
# steps of 4096 tokens); SWA is off because in a 4-minute run its snapshots span too much of the LR
# decay (10 snapshots: 2.266 bpb vs 2.246 for the last weights). The tiny model's matrices all have at
# most 65,536 elements: QAT and the artifact act on all of them (qat_small_numel 0, which the
# quantiser's --quant-small-numel follows).
DEMO_TRAIN_DEFAULTS = dict(max_wallclock_seconds=240.0, grad_accum_steps=1, val_every=0, log_every=25,
                           checkpoint_every=50, swa=False, matrix_lr=0.04, tied_embed_lr=0.04, scalar_lr=0.02,
                           qat_small_numel=0)
# No compiler to warm up on the CPU; fp32 Newton-Schulz (bf16 matmuls are slow on most CPUs).
CPU_TRAIN_DEFAULTS = dict(warmup_steps=0, compile=False, muon_dtype="float32")
UNIGRAM_MAX_TRAIN_TOKENS = 100_000_000   # counts for the unigram baseline: the first ~shard of FineWeb
ARTIFACT_NAME = "model.int6.ptz"
# What a run writes in its --out-dir; a directory holding any of them is an earlier run's.
RUN_OUTPUTS = ("train.log", "checkpoint.pt", "final_model.pt", "summary.json", ARTIFACT_NAME)
# TTT on a CPU is reduced to one epoch per chunk (the seed: 3); every other TTT setting is the seed's.
CPU_TTT_EPOCHS = 1
# The quantisation comparison of the demo: (label, plan, loop-aware), all measured in the same run.
QUANT_COMPARISON = (("(a) round-to-nearest, seed's 1/31 floor", "rtn_seed_floor", False),
                    ("(b) the seed's plan (GPTQ, 1/31 floor, RTN embeddings)", "seed", False),
                    ("(c) ours: GPTQ + SDClip, GPTQ'd embedding at int8 if it fits", "default", False),
                    ("(d) ours + loop-aware GPTQ", "default", True))
# Run options (beyond TrainConfig) whose change changes the trained weights: a resume names them.
TRAINING_RUN_OPTIONS = ("device", "ops", "threads")
# Options a resume does not take from the checkpoint: where to resume from and write to, and the weights
# a new run starts from (a resumed run has its own).
NOT_RESTORED = ("resume", "out_dir", "init_from", "overwrite")
# Options that shape the model config (a resume compares the config itself, crawler.training.loop).
MODEL_OPTIONS = ("preset", "vocab_size", "train_seq_len", "train_batch_tokens", "model_set")


def _as_flags(options: dict) -> str:
    def flag(key, value):
        name = key.replace("_", "-")
        if isinstance(value, bool):
            return f"--{name}" if value else f"--no-{name}"
        return f"--{name} {value}"
    return " ".join(flag(k, v) for k, v in options.items())


def _threads(text: str) -> int | str:
    """--threads: a count >= 1 or "idle" (crawler.runtime.resolve_cpu_threads makes it a count)."""
    if text == "idle":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a thread count >= 1 or 'idle', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[shared_options()],
        epilog=f"Built-in corpus demo defaults (no --data-dir): {_as_flags(DEMO_TRAIN_DEFAULTS)}; on a CPU "
               f"also {_as_flags(CPU_TRAIN_DEFAULTS)}. Explicit options always win.")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=None,
                     help="model preset (default: pr1579 on a GPU with --data-dir, else tiny)")
    run.add_argument("--out-dir", default=None,
                     help="directory for train.log, checkpoint.pt, final_model.pt, summary.json "
                          "(default: the --resume checkpoint's directory, else runs/<preset>-<time>)")
    run.add_argument("--resume", default=None, metavar="CHECKPOINT",
                     help="continue a run from its checkpoint.pt with the options it was started with; options "
                          "given here override them (those that change training are named in the log)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the outputs of an earlier run in --out-dir (default: an --out-dir that holds "
                          "a run is refused, unless --resume continues it)")
    run.add_argument("--init-from", default=None, metavar="WEIGHTS",
                     help="start a new run from the weights of a plain state dict or checkpoint (e.g. PR #1579's "
                          "final_model.pt) with fresh optimisers (the seed's RESUME_FROM)")
    run.add_argument("--threads", type=_threads, default=None,
                     help="CPU intra-op threads: a count, or 'idle' for the cores not busy by the load average "
                          "(faster on a shared machine, not bit-reproducible) (default: the machine's cores, "
                          "fixed, so identical runs are bitwise equal)")
    data = p.add_argument_group("built-in corpus, validation and baselines")
    data.add_argument("--cache-dir", default=None,
                      help="where the built-in corpus is cached (default: $CRAWLER_CACHE or "
                           "~/.cache/crawler-kernels/corpus)")
    data.add_argument("--val-max-tokens", type=int_at_least(2), default=None,
                      help="score only the first N validation tokens, at least train_seq_len + 1 (default: all)")
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
                       help="any other CrawlerConfig field, read by its type (bools true/false/1/0, numbers, "
                            "text; xsa also a list), e.g. --model-set model_dim=192 --model-set xsa=pr1579 "
                            "--model-set 'xsa=[0,1]'; repeatable. Fields: " +
                            ", ".join(f.name for f in dataclasses.fields(CrawlerConfig)))
    TrainConfig.add_arguments(p)
    post = p.add_argument_group("after training: quantise -> artifact -> evaluate")
    post.add_argument("--quantize", action=argparse.BooleanOptionalAction, default=True,
                      help="write the int6 artifact (out-dir/" + ARTIFACT_NAME + ") and score its round trip "
                           "(default: on)")
    post.add_argument("--quant-plan", choices=sorted(PLANS), default="default",
                      help="quantisation plan of the artifact: default (ours: GPTQ + SDClip floored at 1e-10, "
                           "GPTQ'd tied embedding), seed (PR #1579's), rtn_seed_floor (round-to-nearest, 1/31 "
                           "floor) (default: default)")
    post.add_argument("--loop-aware", action=argparse.BooleanOptionalAction, default=False,
                      help="loop-aware two-phase GPTQ for the artifact (default: off)")
    post.add_argument("--compare-quant", action=argparse.BooleanOptionalAction, default=None,
                      help="also measure the round-trip gap of (a) RTN with the seed's floor, (b) the seed's "
                           "plan, (c) ours, (d) ours loop-aware (default: on for the built-in corpus)")
    post.add_argument("--quant-small-numel", type=int_at_least(0), default=None,
                      help="matrices with at most this many elements stay fp16 (default: the run's --qat-small-numel, "
                           "so QAT and the artifact act on the same matrices)")
    post.add_argument("--target-bytes", type=int_at_least(1), default=BUDGET_BYTES,
                      help=f"artifact + code byte target; ±1 codes are pruned to fit (default: {BUDGET_BYTES:,})")
    post.add_argument("--sliding", action=argparse.BooleanOptionalAction, default=True,
                      help="score the artifact with the sliding window (default: on)")
    post.add_argument("--eval-stride", type=int_at_least(1), default=64, help="sliding-window stride (default: 64)")
    post.add_argument("--ttt", action=argparse.BooleanOptionalAction, default=True,
                      help="score the artifact with legal score-first TTT (default: on)")
    add_ttt_arguments(p, epochs_default=f"{TTTConfig.epochs}, the seed's; {CPU_TTT_EPOCHS} on a CPU")
    return p


def _model_config(args, base: CrawlerConfig | None = None) -> CrawlerConfig:
    """The run's CrawlerConfig: `base` (a resumed checkpoint's) or args.preset's, with the model options
    of args on top."""
    overrides = {}
    for item in args.model_set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SetupError(f"--model-set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = parse_field(key, value)
        except ValueError as e:
            raise SetupError(f"--model-set {item!r}: {e}") from None
    for key in ("vocab_size", "train_seq_len", "train_batch_tokens"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    try:
        if base is not None:
            return dataclasses.replace(base, **overrides)
        return CrawlerConfig.preset(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise SetupError(f"{e} (check --preset / --model-set / --vocab-size options)") from None


def stage_data(args, model_config, log, *, doc_isolated: bool):
    """The data directory and tokenizer (the built-in corpus if none is given), checked and loaded (a
    tokenizer with a BOS when the run isolates documents)."""
    data_dir, tokenizer = resolve_data(args.data_dir, args.tokenizer, model_config.vocab_size,
                                      cache_dir=args.cache_dir, log=log)
    return prepare_data(data_dir, tokenizer, model_config.vocab_size, val_max_tokens=args.val_max_tokens,
                        min_val_tokens=model_config.train_seq_len + 1,
                        allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, doc_isolated=doc_isolated)


def stage_baselines(data, model_config) -> dict:
    """The unigram baseline's val_loss / val_bpb on the validation tokens the model is scored on."""
    counts = data.train_token_counts(model_config.vocab_size, UNIGRAM_MAX_TRAIN_TOKENS)
    loss, bpb = unigram_bpb(counts, data.val_tokens, data.luts, seq_len=model_config.train_seq_len)
    return {"unigram_val_loss": loss, "unigram_val_bpb": bpb}


def stage_quantize(args, model, data, train_summary: dict, out_dir: Path, log, *, doc_isolated: bool) -> dict:
    """The int6 artifact of the trained model and its round-trip val_bpb; with --compare-quant, the gaps of
    the QUANT_COMPARISON plans measured on the same model, all from one Calibration (the Hessians are
    collected once). Returns {"artifact": summary of the written artifact, "comparison": [(label,
    summary), ...]}."""
    pre_quant = (train_summary["final_val_loss"], train_summary["final_val_bpb"])
    chosen = (args.quant_plan, args.loop_aware)
    runs = [(label, plan, loop_aware) for label, plan, loop_aware in QUANT_COMPARISON] if args.compare_quant else []
    if chosen not in [(plan, loop_aware) for _, plan, loop_aware in runs]:
        runs.append((f"artifact: {args.quant_plan}{' loop-aware' if args.loop_aware else ''}", *chosen))
    plans = [dataclasses.replace(get_plan(plan), small_numel=args.quant_small_numel) for _, plan, _ in runs]
    calibration = (Calibration.from_data(model, data.data_dir, log=log) if any(p.needs_hessians() for p in plans)
                   else None)
    out = {"comparison": []}
    for (label, plan, loop_aware), plan_spec in zip(runs, plans):
        log(f"quantise: {label}")
        written = (plan, loop_aware) == chosen
        result = quantize_and_evaluate(model, data.data_dir, data.luts, data.val_tokens, plan=plan_spec,
                                       loop_aware=loop_aware, target_bytes=args.target_bytes,
                                       out_path=out_dir / ARTIFACT_NAME if written else None,
                                       calibration=calibration, pre_quant=pre_quant, tokenizer=data.tokenizer,
                                       doc_isolated=doc_isolated,
                                       log=log)
        out["comparison"].append((label, result))
        if written:
            out["artifact"] = result
            log(score_line("final_int6_roundtrip", result["quant_val_loss"], result["quant_val_bpb"],
                           eval_ms=1000.0 * result["quant_eval_seconds"]))
            log(exact_line("final_int6_roundtrip", result["quant_val_loss"], result["quant_val_bpb"]))
    return out


def ttt_config(args, device: torch.device) -> TTTConfig:
    """The TTT settings of the artifact's evaluation: the --ttt-* flags over the seed's values, with fewer
    epochs on a CPU unless --ttt-epochs is given."""
    return ttt_config_from_args(args, **({"epochs": CPU_TTT_EPOCHS} if device.type == "cpu" else {}))


def stage_evaluate(args, artifact_path: Path, data, model_config, device: torch.device, log, *,
                   doc_isolated: bool) -> dict:
    """Sliding-window and legal score-first TTT val_bpb of the artifact (dequantised), with timings;
    document-isolated when the run trained so."""
    model = model_from_artifact(artifact_path, device=device, ops=args.ops)
    T, out = model_config.train_seq_len, {}
    if args.sliding:
        t0 = time.perf_counter()
        loss, bpb = sliding_window_bpb(model, data.val_tokens, data.luts, seq_len=T, stride=args.eval_stride,
                                       doc_isolated=doc_isolated)
        out["sliding_val_loss"], out["sliding_val_bpb"], out["sliding_seconds"] = loss, bpb, time.perf_counter() - t0
        log(score_line("final_int6_sliding_window", loss, bpb, extra=f" stride:{args.eval_stride}",
                       eval_ms=1000.0 * out["sliding_seconds"]))
        log(exact_line("final_int6_sliding_window", loss, bpb))
    if args.ttt:
        config = ttt_config(args, device)
        t0 = time.perf_counter()
        loss, bpb = legal_ttt_bpb(model, data.val_tokens, data.luts, seq_len=T, stride=args.eval_stride,
                                  config=config, log=log, doc_isolated=doc_isolated)
        out["ttt_val_loss"], out["ttt_val_bpb"] = loss, bpb
        out["ttt_seconds"], out["ttt_epochs"] = time.perf_counter() - t0, config.epochs
        log(score_line("final_ttt_sliding", loss, bpb, eval_ms=1000.0 * out["ttt_seconds"]))
        log(exact_line("legal_ttt", loss, bpb))
    return out


def resolve_options(args, device: torch.device, resumed: dict | None = None) -> tuple[CrawlerConfig, TrainConfig]:
    """The model and training configs of this run, and the defaults that depend on it (preset, demo and
    CPU training defaults, baselines, the quantisation comparison, the thread count), checked before
    anything runs: every option of a later stage too (validation length, byte target, evaluation windows,
    TTT chunks). `resumed` ({"config", "train_config"} of the checkpoint being resumed) replaces the
    preset and the defaults: the options on the command line apply on top of the checkpoint's."""
    resolve_ops(args.ops, device)
    builtin = args.data_dir is None
    if args.preset is None:
        args.preset = "pr1579" if device.type == "cuda" and not builtin else "tiny"
    model_config = _model_config(args, resumed["config"] if resumed else None)
    if resumed:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        defaults = {k: v for k, v in resumed["train_config"].items() if k in known}
    else:
        defaults = {**(DEMO_TRAIN_DEFAULTS if builtin else {}), **(CPU_TRAIN_DEFAULTS if device.type == "cpu" else {})}
    try:
        tc = TrainConfig(**{**defaults, **TrainConfig.overrides(args)})
        tc.validate()
    except TypeError as e:
        raise SetupError(str(e)) from None
    tc.compiles(device, args.ops)      # a combination that cannot compile here is refused now
    resolve_grad_accum(tc, env_world_size())   # before any process group waits on a bad world size
    if args.baselines is None:
        args.baselines = builtin
    if args.compare_quant is None:
        args.compare_quant = builtin
    if args.quant_small_numel is None:
        args.quant_small_numel = tc.qat_small_numel
    if device.type == "cpu":
        args.threads = resolve_cpu_threads(args.threads)
    T = model_config.train_seq_len
    if args.val_max_tokens is not None and args.val_max_tokens < T + 1:
        raise SetupError(f"--val-max-tokens {args.val_max_tokens} is shorter than one evaluation window "
                         f"(sequence length {T} + 1): raise it, or leave it out to score every validation token")
    if args.quantize:
        code = size_report(0).code_bytes
        if args.target_bytes <= code:
            raise SetupError(f"--target-bytes {args.target_bytes:,} leaves no room for the artifact: the counted code "
                             f"alone is {code:,} B (default target {BUDGET_BYTES:,})")
    if args.quantize and (args.sliding or args.ttt):
        try:
            plan_windows(1, T, args.eval_stride)
        except ValueError:
            raise SetupError(f"--eval-stride {args.eval_stride} must be in [1, sequence length {T}]: lower it, or "
                             f"skip the window evaluations with --no-sliding --no-ttt") from None
    if args.quantize and args.ttt:
        try:
            ttt_config(args, device).check(T)
        except ValueError as e:
            raise SetupError(f"{e}: set --ttt-chunk-tokens / --ttt-epochs, or skip TTT with --no-ttt") from None
    return model_config, tc


def prepare_out_dir(args, out_dir: Path) -> None:
    """Make --out-dir ready before any stage runs (rank 0): created and writable, and refused when it
    holds an earlier run's outputs unless this run continues it (--resume of its own checkpoint) or
    replaces it (--overwrite, which deletes those outputs first)."""
    continuing = args.resume is not None and Path(args.resume).resolve().parent == out_dir.resolve()
    prepare_output_dir(out_dir, "--out-dir", outputs=() if continuing else RUN_OUTPUTS, replace=args.overwrite,
                       hint=f"continue it with --resume {out_dir / 'checkpoint.pt'}, replace it with --overwrite, "
                            f"or choose another --out-dir")


def restore_resumed_options(args, given: set[str]) -> tuple[dict, list[str]]:
    """For --resume: the checkpoint's model and training configs ({"config", "train_config"}; the config
    None when --preset is given again, which then replaces it) and the log lines of restoring the run's
    other options into `args` (crawler.training.resume). The checkpoint is read here only for these."""
    if not Path(args.resume).is_file():
        raise SetupError(f"--resume {args.resume!r} does not exist: give the checkpoint.pt of the run to continue")
    ckpt = read_checkpoint(args.resume, expect="training")
    compared = set(vars(args)) - {f.name for f in dataclasses.fields(TrainConfig)} - set(MODEL_OPTIONS)
    lines = restore_run_options(args, ckpt.contents.get(RUN_OPTIONS_KEY), given, not_restored=NOT_RESTORED,
                                compared=compared, trajectory=TRAINING_RUN_OPTIONS, source=str(args.resume))
    resumed = {"config": None if "preset" in given else ckpt.config, "train_config": ckpt.contents["train_config"]}
    return resumed, lines


def run(args, given: set[str] = frozenset()) -> dict:
    """Every stage of a run with the options `args` (`given`: the options given on the command line,
    which win over a resumed checkpoint's)."""
    if args.resume and args.init_from:
        raise SetupError("--resume continues a run, --init-from starts a new one from weights: give one of them")
    resumed, resume_lines = restore_resumed_options(args, given) if args.resume else (None, [])
    device = resolve_device(args.device)
    model_config, tc = resolve_options(args, device, resumed)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    with reproducible(device), distributed(device) as ctx, contextlib.ExitStack() as held:
        t_start = time.perf_counter()
        stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        out_dir = Path(args.out_dir) if args.out_dir else (
            Path(args.resume).parent if args.resume else Path("runs") / f"{args.preset}-{stamp}")
        error = None
        if ctx.is_main:
            try:
                # Locked before it is checked, and held until the run ends: no second run (fresh or
                # resumed) checks or writes this directory meanwhile.
                held.enter_context(hold_directory_lock(out_dir, "--out-dir"))
                prepare_out_dir(args, out_dir)
            except SetupError as e:
                error = str(e)
        error = broadcast_object(error)      # every rank stops on rank 0's verdict
        if error is not None:
            raise SetupError(error)
        log = RunLogger(out_dir, enabled=ctx.is_main)
        for line in resume_lines:
            log(line)
        data = stage_data(args, model_config, log, doc_isolated=tc.doc_isolated)
        # Every val_bpb of the run (training's, the round trips', the artifact's) isolates documents or none does.
        report = {"stages_s": {"data": time.perf_counter() - t_start}, "doc_isolated": tc.doc_isolated}
        if args.baselines and ctx.is_main:
            report.update(stage_baselines(data, model_config))

        t0 = time.perf_counter()
        try:
            result = train(model_config, tc, data, out_dir=out_dir, ops=args.ops, resume=args.resume,
                           init_from=args.init_from, run_options=vars(args).copy(), ctx=ctx, log=log)
        except KeyboardInterrupt:
            ckpt = out_dir / "checkpoint.pt"
            if ctx.is_main:
                hint = (f"continue with: python train.py --resume {ckpt}" if ckpt.is_file()
                        else "no checkpoint was written yet (see --checkpoint-every)")
                print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise SystemExit(130) from None
        report["stages_s"]["train"] = time.perf_counter() - t0
        quant = None
        if args.quantize:
            t0 = time.perf_counter()
            quant = stage_quantize(args, result.model, data, result.summary, out_dir, log, doc_isolated=tc.doc_isolated)
            report["stages_s"]["quantize"] = time.perf_counter() - t0
            report["quantization"] = [{"label": label, **r} for label, r in quant["comparison"]]
            if args.sliding or args.ttt:
                t0 = time.perf_counter()
                report.update(stage_evaluate(args, out_dir / ARTIFACT_NAME, data, model_config, device, log,
                                             doc_isolated=tc.doc_isolated))
                report["stages_s"]["evaluate"] = time.perf_counter() - t0

        summary = {**result.summary, **report, "out_dir": str(out_dir)}
        if ctx.is_main:
            print_table(summary_rows(
                preset=args.preset, train=result.summary, report=report,
                quantization=quant["comparison"] if quant else None, artifact=quant["artifact"] if quant else None,
                eval_stride=args.eval_stride, ttt_reduced=device.type == "cpu" and args.ttt_epochs is None,
                artifact_path=out_dir / ARTIFACT_NAME if quant else None, out_dir=out_dir), log=log)
            write_json(out_dir / "summary.json", summary)
        return summary


def main(argv=None) -> int:
    """The command line; returns the exit status (crawler.cli.run_main: 2 with one `error:` line for a
    bad option, file or write; 130 when interrupted)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        run(args, given_options(build_parser, argv))
        return 0
    return run_main("train.py", body)


if __name__ == "__main__":
    sys.exit(main())
