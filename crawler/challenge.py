"""The challenge's interface of an exported train_gpt.py (docs/submission.md): the environment variables the
Parameter Golf scripts read become train.py's options, so `SEED=1 torchrun --standalone --nproc_per_node=8
train_gpt.py` runs train.py's stages (train, quantise, score) on the challenge's data layout.

Names. A setting the challenge's scripts also have keeps their name (CHALLENGE_NAMES: the baseline's, the
records' and the seed's, PR #1579's); every other train.py option is CRAWLER_<OPTION> (CRAWLER_PRESET,
CRAWLER_QUANT_PLAN, CRAWLER_MODEL_SET='bigram_dim=8 ve_dim=8', ...), and a model field the challenge names
(MODEL_DIM, CRAWLER_LOOPS, ...) becomes a --model-set item. Values are written as on the command line;
switches are 1/0 (or true/false, yes/no, on/off). `variables(parser)` lists them all.

Defaults. An export's are its run's options, written as such variables at the top of train_gpt.py; the
environment overrides them. DATA_PATH and TOKENIZER_PATH default to the challenge's layout below DATA_DIR
(the records' name, default ./data/): DATA_DIR/datasets/fineweb10B_sp<VOCAB_SIZE> and
DATA_DIR/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model. The run writes into ARTIFACT_DIR (the records' name),
else runs/<RUN_ID> (the baseline's run name), else train.py's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import typing
from collections.abc import Mapping

from .cli import run_main
from .config import CrawlerConfig
from .errors import SetupError

PREFIX = "CRAWLER_"
# Settings whose name in the challenge's scripts is the upper-case name of ours.
_SAME_NAME = ("seed iterations max_wallclock_seconds warmup_steps warmdown_iters warmdown_frac matrix_lr scalar_lr "
              "tied_embed_lr muon_momentum muon_momentum_warmup_start muon_momentum_warmup_steps muon_backend_steps "
              "muon_row_normalize adam_eps grad_clip_norm ema_decay qat_bits qat_mlp_bits late_qat_threshold "
              "progressive_schedule eval_stride ttt_epochs ttt_chunk_tokens ttt_freeze_blocks vocab_size "
              "train_seq_len train_batch_tokens model_dim num_heads num_kv_heads mlp_mult rope_base logit_softcap "
              "qk_gain_init tie_embeddings tied_embed_init_std num_flat_blocks num_crawler_blocks crawler_loops "
              "ve_last_n").split()
# {challenge name: our train.py option or CrawlerConfig field}.
CHALLENGE_NAMES = {**{name.upper(): name for name in _SAME_NAME},
                   "DATA_PATH": "data_dir", "TOKENIZER_PATH": "tokenizer", "ARTIFACT_DIR": "out_dir",
                   "VAL_LOSS_EVERY": "val_every", "TRAIN_LOG_EVERY": "log_every", "MUON_WD": "muon_weight_decay",
                   "ADAM_WD": "adam_weight_decay", "BETA1": "adam_beta1", "BETA2": "adam_beta2",
                   "SWA_START_FRAC": "swa_start_mult", "RESUME_FROM": "init_from", "LOOP_AWARE_GPTQ": "loop_aware",
                   "SLIDING_WINDOW_ENABLED": "sliding", "TTT_ENABLED": "ttt"}
SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
DEFAULT_DATA_DIR = "./data/"
HELP = """usage: [VARIABLE=VALUE ...] torchrun --standalone --nproc_per_node=N train_gpt.py

Trains, quantises and scores as train.py of crawler-kernels does. Its settings are environment variables
(their defaults, this run's options, are on line 1); crawler-kernels' docs/submission.md says what each sets."""


def variables(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{environment variable: the train.py option destination or CrawlerConfig field it sets}, in the
    order their options are applied (the parser's, then the model fields, so MODEL_DIM wins over an item of
    CRAWLER_MODEL_SET)."""
    ours = {dest: name for name, dest in CHALLENGE_NAMES.items()}
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    fields = [f.name for f in dataclasses.fields(CrawlerConfig) if f.name in ours and f.name not in dests]
    return {ours.get(dest, PREFIX + dest.upper()): dest for dest in dests + fields}


def switch(name: str, value: str) -> bool:
    """The boolean of a switch variable's `value`; SetupError naming the variable otherwise."""
    try:
        return SWITCH[value.strip().lower()]
    except KeyError:
        raise SetupError(f"{name}={value!r}: expected 1 or 0 (true/false, yes/no, on/off)") from None


def with_paths(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the challenge's path defaults filled in (module docstring): DATA_PATH and TOKENIZER_PATH
    below DATA_DIR for VOCAB_SIZE, and ARTIFACT_DIR from RUN_ID."""
    env = dict(env)
    if "VOCAB_SIZE" in env:
        root = env.get("DATA_DIR", DEFAULT_DATA_DIR).rstrip("/")
        env.setdefault("DATA_PATH", f"{root}/datasets/fineweb10B_sp{env['VOCAB_SIZE']}")
        env.setdefault("TOKENIZER_PATH", f"{root}/tokenizers/fineweb_{env['VOCAB_SIZE']}_bpe.model")
    if "RUN_ID" in env:
        env.setdefault("ARTIFACT_DIR", f"runs/{env['RUN_ID']}")
    return env


def train_argv(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> list[str]:
    """train.py's command line for the variables of `env` that name one of its settings (others are
    ignored). SetupError for a switch that is not 1/0."""
    actions = {a.dest: a for a in parser._actions}
    hints = typing.get_type_hints(CrawlerConfig)
    argv = []
    for name, dest in variables(parser).items():
        if name not in env:
            continue
        value, action = env[name], actions.get(dest)
        if action is None:                              # a model field without an option of its own
            value = ("true" if switch(name, value) else "false") if hints[dest] is bool else value
            argv += ["--model-set", f"{dest}={value}"]
        elif action.nargs == 0:                          # --x (store_true) or --x/--no-x
            on = switch(name, value)
            if on or len(action.option_strings) > 1:
                argv.append(action.option_strings[0 if on else 1])
        elif isinstance(action, argparse._AppendAction):
            argv += [part for item in shlex.split(value) for part in (action.option_strings[0], item)]
        else:
            argv += [action.option_strings[0], value]
    return argv


def main(train, defaults: Mapping[str, str], args: list[str] | None = None) -> int:
    """Run the module `train` (train.py) with `defaults` (an export's run options, as variables) under the
    environment; returns its exit status. train_gpt.py takes no arguments (`args`, default sys.argv[1:]):
    -h/--help prints how to set it up and every variable (its parser's help texts are not exported), any
    other argument is refused, like a bad variable, with one `error:` line and status 2."""
    args = sys.argv[1:] if args is None else args
    parser = train.build_parser()
    if args in (["-h"], ["--help"]):
        print(f"{HELP}\n\nvariables: DATA_DIR, RUN_ID, {', '.join(variables(parser))}")
        return 0
    argv = []

    def build() -> int:
        if args:
            raise SetupError(f"no arguments are taken, got {shlex.join(args)}: set environment variables (--help)")
        argv.extend(train_argv(parser, with_paths({**defaults, **os.environ})))
        return 0
    return run_main("train_gpt.py", build) or train.main(argv)
