"""What a resumed run restores: the options the run was started with (recorded in its checkpoint under
RUN_OPTIONS_KEY), the ones given again on the command line (they win, and are logged as such), and
which changes make the resumed run differ from the uninterrupted one (those are named); whether a
checkpoint fits this run at all (model architecture, data and tokenizer); and the training state itself
(`restore_training_state`, the inverse of the loop's `checkpoint_state`).

A resume on the same machine with no option changed (the same world size, thread count and ops) trains
bit-identically to the uninterrupted run (docs/math.md §2); `option_changes` names every option whose
change breaks that.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection

import torch

from ..checkpoint import Checkpoint
from ..config import CrawlerConfig
from ..errors import SetupError
from ..model import load_state_into
from .config import TrainConfig
from .data import TrainData

RUN_OPTIONS_KEY = "run_options"        # the checkpoint entry holding the command line's resolved options
NOT_BIT_IDENTICAL = "the resumed run is not bit-identical to an uninterrupted one"


def given_options(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None) -> set[str]:
    """The destinations of the options given explicitly in `argv` (None: sys.argv[1:]), found by parsing
    it again with every default suppressed, so an option given with its default value still counts."""
    parser = build_parser()
    for action in parser._actions:      # argparse offers no public way to suppress every default
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def option_changes(saved: dict, now: dict, *, trajectory: Collection[str]) -> str | None:
    """"name old -> new, ..." for every key of `now` whose value differs from `saved` (a key `saved`
    lacks counts as changed), naming the changed keys in `trajectory` as breaking bit-identity; None when
    nothing changed."""
    changed = sorted(k for k, v in now.items() if k not in saved or saved[k] != v)
    if not changed:
        return None
    line = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed)
    breaking = [k for k in changed if k in trajectory]
    if breaking:
        line += f" ({', '.join(breaking)} change{'s' if len(breaking) == 1 else ''} training: {NOT_BIT_IDENTICAL})"
    return line


def restore_run_options(args: argparse.Namespace, saved: dict | None, given: set[str], *,
                        not_restored: Collection[str], compared: Collection[str], trajectory: Collection[str],
                        source: str) -> list[str]:
    """Put the `saved` run options of checkpoint `source` into `args` (in place), except those in
    `given` (the command line's win; a given list option, such as --model-set, extends the saved list)
    and those in `not_restored`. Returns the log lines: what was restored, which options the command
    line gave, and how those among `compared` changed (changes of options in `trajectory` named as
    breaking bit-identity; the caller compares the others against what they resolved to). `saved` None
    (a checkpoint written without run options) restores nothing."""
    if saved is None:
        return [f"resume: {source!r} records no run options (written by crawler.training.train directly or an "
                f"older version): the command line's options apply"]
    for key, value in saved.items():
        if key in not_restored or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, value)
        elif isinstance(value, list):
            setattr(args, key, value + [v for v in getattr(args, key) if v not in value])
    lines = [f"resume: the run's options are restored from {source!r}"]
    explicit = sorted(given - set(not_restored))
    if explicit:
        lines[0] += "; given on the command line: " + ", ".join("--" + k.replace("_", "-") for k in explicit)
        changes = option_changes(saved, {k: getattr(args, k) for k in explicit if k in compared},
                                 trajectory=trajectory)
        if changes:
            lines.append(f"resume: options changed: {changes}")
    return lines


# Model-config fields that may differ on resume: how a run feeds data (changing them changes training)
# and the token embedding's initial std (read only when the weights are initialised).
_FEED_FIELDS = ("train_seq_len", "train_batch_tokens")
_NON_ARCH_FIELDS = (*_FEED_FIELDS, "tied_embed_init_std")


def architecture_differences(saved: CrawlerConfig, now: CrawlerConfig) -> str | None:
    """"field: checkpoint A vs now B, ..." for the architecture fields that differ; None if none do."""
    a, b = saved.to_dict(), now.to_dict()
    diff = sorted(k for k in b if k not in _NON_ARCH_FIELDS and a.get(k) != b[k])
    return ", ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b[k]!r}" for k in diff) or None


def check_resume_compatible(ckpt: Checkpoint, model_config: CrawlerConfig, data: TrainData) -> list[str]:
    """SetupError unless the checkpoint's model architecture and data/tokenizer match this run's.
    Returns warnings for fields that may differ (batch size, sequence length, initial embedding std)."""
    path, state = ckpt.path, ckpt.contents
    detail = architecture_differences(ckpt.config, model_config)
    if detail:
        raise SetupError(f"cannot resume {str(path)!r}: its model config differs ({detail}); rerun with the "
                         f"same --preset and model options as the run that wrote it")
    if state["data"] != data.identity:
        diff = sorted(k for k in data.identity if state["data"].get(k) != data.identity[k])
        raise SetupError(f"cannot resume {str(path)!r}: it was trained on other data or another tokenizer "
                         f"(differs in: {', '.join(diff)}); rerun with the same --data-dir and --tokenizer")
    saved, now = ckpt.config.to_dict(), model_config.to_dict()
    changes = option_changes(saved, {k: now[k] for k in _NON_ARCH_FIELDS}, trajectory=_FEED_FIELDS)
    return [f"resume: model options changed: {changes}"] if changes else []


def restore_training_state(trainer, ckpt: Checkpoint) -> None:
    """Continue `trainer` (crawler.training.loop's) from a "training" checkpoint, as its
    `checkpoint_state` wrote it: checked against this run's model and data first, then the weights,
    optimisers (this run's hyper-parameters win), SWA/EMA, data position, RNG, step, history, QAT state
    and loop variant."""
    state, path = ckpt.contents, ckpt.path
    for warning in check_resume_compatible(ckpt, trainer.mc, trainer.data):
        trainer.log(warning)
    if state["world_size"] != trainer.ctx.world_size:
        trainer.log(f"resume: checkpoint was written with world size {state['world_size']}, now "
                    f"{trainer.ctx.world_size}; the data order differs from an uninterrupted run")
    changes = option_changes(state["train_config"], dataclasses.asdict(trainer.tc),
                             trajectory=TrainConfig.trajectory_fields())
    if changes:
        trainer.log(f"resume: training options changed: {changes}")
    # The checksum proves the file is as written, not that its tensors fit the config it records.
    try:
        load_state_into(trainer.model, ckpt.state_dict)
        for opt, sd in zip(trainer.optimizers, state["optimizers"], strict=True):
            # load_state_dict also restores the saved hyper-parameters; this run's options win.
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict(sd)
            for group, hyper in zip(opt.param_groups, current):
                group.update(hyper)
    except ValueError as e:
        raise SetupError(f"cannot resume {str(path)!r}: its weights or optimiser states do not fit the model "
                         f"config it records ({e}); it was not written by this trainer for that config") from None
    trainer.swa.load_state_dict(state["swa"])
    if trainer.ema is not None:
        if state["ema"] is None:
            trainer.log("resume: EMA was off in the checkpoint; starting it from the current weights")
        else:
            trainer.ema.load_state_dict(state["ema"])
    try:
        trainer.loader.load_state_dict(state["loader"])
    except ValueError as e:
        raise SetupError(f"cannot resume {str(path)!r}: {e}") from None
    torch.set_rng_state(state["rng"]["torch"])
    if trainer.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], trainer.device)
    trainer.step, trainer.train_time_ms = int(state["step"]), float(state["train_time_ms"])
    trainer.history = state["history"]
    trainer.qat.set_active(bool(state.get("qat_active", trainer.qat.active)))
    trainer.set_loops(trainer.loops.loops_at(trainer.step))
    trainer.log(f"resume: continuing {str(path)!r} at step {trainer.step}, "
                f"train_time {trainer.train_time_ms:.0f}ms")
