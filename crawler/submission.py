"""python -m crawler.submission: from finished train.py runs to a Parameter Golf records folder
(docs/submission.md).

    python -m crawler.submission RUN_DIR [RUN_DIR ...] --name NAME --author A --github-id G [--blurb TEXT]

Each RUN_DIR is one seed's run of the same options (train.py's --out-dir: train.log, checkpoint.pt,
summary.json, the artifact). It writes records/track_<track>/<date>_<name>/:
  * train_gpt.py: the run's options (as the challenge's environment variables, crawler.challenge) on its
    first line, then every module that training, quantisation and scoring import (crawler.budget decides
    which), stripped, brotli-compressed and written as text (base-93) inside a bootstrap that imports them
    from memory (kernels.bundle). `torchrun --standalone --nproc_per_node=N train_gpt.py` trains, quantises
    and scores as train.py does, writing only into its run directory and fetching nothing;
  * submission.json (the records' fields, filled from the runs' summary.json), README.md (configuration,
    scores, bytes, how to reproduce), requirements.txt (the third-party modules the code imports, at the
    installed versions) and train_seed<S>.log, each run's log.
It prints the counted bytes: code (the source files, and train_gpt.py as written), each seed's artifact
and total against the 16,000,000-byte budget.

Checked before anything is written: every run is complete and was started from scratch with the same
options but the seed; its artifact fits the budget beside this train_gpt.py; the tokenizer given
(--tokenizer, default the run's own) is the one the artifact was trained with; the records folder holds
no earlier export unless --overwrite; and no other process writes that folder meanwhile (a lock held while
writing). A failure is one `error:` line and exit status 2 (crawler.cli.run_main).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kernels import __version__
from kernels.bundle import third_party_imports

from .artifact import load_artifact
from .budget import BUDGET_BYTES, code_bytes, counted_modules
from .challenge import variables
from .checkpoint import read_checkpoint
from .cli import run_main
from .config import CrawlerConfig
from .errors import SetupError
from .export import exported_module, load_train, module_costs, train_gpt
from .fileio import hold_directory_lock, prepare_output_dir, write_bytes, write_json
from .tokenizer import TOKENIZER_FILE, load_checked_tokenizer
from .training import TrainConfig
from .training.resume import RUN_OPTIONS_KEY

TRACK = "10min_16mb"
SEED_CODE_BYTES = 90_756      # the seed's (PR #1579's) train_gpt.py, for comparison
RECORD_FILES = ("train_gpt.py", "submission.json", "README.md", "requirements.txt")
# train.py options an export never carries: where the run read and wrote, and how it started.
NOT_CARRIED = ("data_dir", "tokenizer", "out_dir", "resume", "overwrite", "cache_dir", "init_from")
# A run's score is its last evaluation of the artifact: (summary.json key prefix, log line name), the
# artifact's round trip (ROUND_TRIP) when it ran neither.
SCORES = (("ttt", "legal_ttt"), ("sliding", "final_int6_sliding_window"))
ROUND_TRIP = "final_int6_roundtrip"


# --------------------------------------------------------------------------------------------------
# Runs

@dataclasses.dataclass(frozen=True)
class Run:
    """What an export reads of a finished run directory."""
    path: Path
    summary: dict
    config: CrawlerConfig
    train_config: dict
    options: dict           # train.py's resolved options, as the checkpoint records them
    artifact_bytes: int
    tokenizer: dict | None  # the identity the artifact records
    log: bytes

    @property
    def seed(self) -> int:
        return int(self.train_config["seed"])

    @property
    def score(self) -> tuple[str, float, float]:
        """(log line name, val_loss, val_bpb) of the run's final score: legal TTT, else the sliding
        window, else the artifact's round trip."""
        for key, name in SCORES:
            if f"{key}_val_bpb" in self.summary:
                return name, self.summary[f"{key}_val_loss"], self.summary[f"{key}_val_bpb"]
        return ROUND_TRIP, self.artifact["quant_val_loss"], self.artifact["quant_val_bpb"]

    @property
    def artifact(self) -> dict:
        """The summary of the written artifact (train.py's quantisation entry that has a path)."""
        return next(r for r in self.summary["quantization"] if r.get("artifact_path"))

    @property
    def counted_code_bytes(self) -> int:
        """The code bytes the run's quantisation counted (its artifact was pruned against them)."""
        return self.artifact["code_bytes"]


def read_run(path: str | Path, artifact_name: str) -> Run:
    """The Run of train.py's output directory `path`; SetupError naming what is missing or unusable."""
    path = Path(path)
    if not path.is_dir():
        raise SetupError(f"run directory {str(path)!r} does not exist: give train.py's --out-dir of a finished run")
    missing = [n for n in ("train.log", "summary.json", "checkpoint.pt", artifact_name) if not (path / n).is_file()]
    if missing:
        raise SetupError(f"run directory {str(path)!r} has no {', '.join(missing)}: give a finished run that "
                         f"quantised its model (train.py without --no-quantize)")
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise SetupError(f"{str(path / 'summary.json')!r} is not JSON ({e}): the run did not finish") from None
    if "quantization" not in summary:
        raise SetupError(f"run directory {str(path)!r}: its summary.json has no quantisation result: the run "
                         f"did not finish")
    ckpt = read_checkpoint(path / "checkpoint.pt", expect="training")
    options = ckpt.contents.get(RUN_OPTIONS_KEY)
    if options is None:
        raise SetupError(f"{str(path / 'checkpoint.pt')!r} records no run options: export a run of train.py")
    if options.get("init_from"):
        raise SetupError(f"run {str(path)!r} started from the weights {options['init_from']!r} (--init-from), "
                         f"which a train_gpt.py cannot carry: export a run trained from scratch")
    artifact = load_artifact(path / artifact_name)
    return Run(path=path, summary=summary, config=ckpt.config, train_config=ckpt.contents["train_config"],
               options=options, artifact_bytes=(path / artifact_name).stat().st_size,
               tokenizer=artifact.tokenizer, log=(path / "train.log").read_bytes())


def _text(value) -> str:
    """A variable's text for a train.py option value (switches 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def export_defaults(run: Run, train) -> dict[str, str]:
    """The run's options as the variables of crawler.challenge (train_gpt.py's defaults): the preset and
    the model fields that differ from it (VOCAB_SIZE always: the data paths follow it), the TrainConfig
    fields that differ from the seed's defaults or that train.py sets by context (its demo and CPU
    defaults), and every other option of the run that is not train.py's default."""
    parser = train.build_parser()
    name_of = {dest: name for name, dest in variables(parser).items()}
    out = {name_of["preset"]: run.options["preset"]}
    base = CrawlerConfig.preset(run.options["preset"])
    model_set = []
    for f in dataclasses.fields(CrawlerConfig):
        value = getattr(run.config, f.name)
        if value == getattr(base, f.name) and f.name != "vocab_size":
            continue
        if f.name in name_of:
            out[name_of[f.name]] = _text(value)
        else:
            model_set.append(f"{f.name}={json.dumps(list(value) if isinstance(value, tuple) else value)}")
    if model_set:
        out[name_of["model_set"]] = shlex.join(model_set)
    seed_recipe = TrainConfig()
    by_context = set(train.DEMO_TRAIN_DEFAULTS) | set(train.CPU_TRAIN_DEFAULTS)
    for f in dataclasses.fields(TrainConfig):
        value = run.train_config[f.name]
        if value is not None and (value != getattr(seed_recipe, f.name) or f.name in by_context):
            out[name_of[f.name]] = _text(value)
    handled = {f.name for f in dataclasses.fields(TrainConfig)} | set(train.MODEL_OPTIONS) | set(NOT_CARRIED)
    for action in parser._actions:
        value = run.options.get(action.dest, action.default)
        if action.dest not in handled and action.dest != "help" and value is not None and value != action.default:
            out[name_of[action.dest]] = _text(value)
    return out


def check_same_options(runs: list[Run], defaults: list[dict[str, str]], seed_variable: str) -> None:
    """SetupError unless the runs differ in their seed only (one train_gpt.py reproduces them all)."""
    first = {k: v for k, v in defaults[0].items() if k != seed_variable}
    for run, other in zip(runs[1:], defaults[1:]):
        other = {k: v for k, v in other.items() if k != seed_variable}
        if other != first:
            differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise SetupError(f"run {str(run.path)!r} differs from {str(runs[0].path)!r} in more than the seed "
                             f"({', '.join(differ)}): export the seeds of one configuration together")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SetupError(f"the runs repeat a seed ({seeds}): give one run per seed")


# --------------------------------------------------------------------------------------------------
# The records folder's files

def requirements(modules) -> str:
    """requirements.txt: each distribution providing a third-party module the code imports, at its
    installed version."""
    provides = importlib.metadata.packages_distributions()
    lines = set()
    for top in third_party_imports(modules):
        for dist in provides.get(top, [top]):
            try:
                lines.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                lines.add(dist)
    return "".join(f"{line}\n" for line in sorted(lines, key=str.lower))


def submission_json(runs: list[Run], args, code_size: int) -> dict:
    """The records' submission.json fields, the mean (and, for several seeds, the sample standard
    deviation) over the seeds of each run's final score."""
    losses, bpbs = [run.score[1] for run in runs], [run.score[2] for run in runs]
    out = {"author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
           "date": args.date, "track": args.track,
           "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs)}
    if len(runs) > 1:
        out["val_bpb_std"] = statistics.stdev(bpbs)
    out |= {"seeds": [run.seed for run in runs],
            "seed_results": {str(run.seed): {"val_loss": run.score[1], "val_bpb": run.score[2],
                                             "artifact_bytes": run.artifact_bytes,
                                             "bytes_total": run.artifact_bytes + code_size} for run in runs},
            "bytes_total": max(run.artifact_bytes for run in runs) + code_size, "bytes_code": code_size,
            "hardware": args.hardware or _hardware(runs[0]), "pytorch_version": torch.__version__}
    return out


def _hardware(run: Run) -> str:
    device = run.summary.get("device", "cpu")
    return f"{run.summary.get('world_size', 1)}x {'CPU' if device.startswith('cpu') else 'CUDA GPU'}"


def readme(runs: list[Run], info: dict, defaults: dict[str, str], sizes: dict, seed_variable: str) -> str:
    """README.md of the records folder: scores per seed, bytes, the configuration (train_gpt.py's
    defaults) and how to reproduce."""
    score_name = runs[0].score[0]
    rows = "".join(f"| {run.seed} | {run.score[2]:.8f} | {run.score[1]:.8f} | {run.artifact_bytes:,} | "
                   f"{run.artifact_bytes + sizes['code']:,} |\n" for run in runs)
    settings = "".join(f"| `{name}` | `{value}` |\n" for name, value in defaults.items() if name != seed_variable)
    world = runs[0].summary.get("world_size", 1)
    blurb = f"\n{info['blurb']}\n" if info["blurb"] else ""
    return f"""# {info['name']}

**val_bpb {info['val_bpb']:.8f}** (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''}, `{score_name}`) |
val_loss {info['val_loss']:.8f} | {info['bytes_total']:,} bytes | {info['hardware']}
{blurb}
| seed | val_bpb | val_loss | artifact bytes | total bytes |
|---|---|---|---|---|
{rows}
Scores are each run's `{score_name}_exact` line (train_seed<S>.log).

## Bytes

| | bytes |
|---|---|
| train_gpt.py (counted code) | {sizes['code']:,} |
| its modules as source files | {sizes['source']:,} |
| the seed's train_gpt.py (PR #1579), for comparison | {SEED_CODE_BYTES:,} |
| artifact + code, largest seed | {info['bytes_total']:,} of {BUDGET_BYTES:,} |

train_gpt.py carries crawler-kernels {__version__}: the crawler transformer of PR #1579 with its Triton
kernels, trainer, GPTQ quantiser, artifact and evaluation, stripped and brotli-compressed; its first line
holds this run's options.

## Configuration

train_gpt.py's defaults, as the environment variables it reads (the environment overrides them; names
without a counterpart in the challenge's scripts start with CRAWLER_):

| variable | value |
|---|---|
{settings}
## Reproduce

```bash
pip install -r requirements.txt
SEED={runs[0].seed} torchrun --standalone --nproc_per_node={world} train_gpt.py
```

It reads DATA_PATH (default `./data/datasets/fineweb10B_sp<VOCAB_SIZE>`) and TOKENIZER_PATH (default
`./data/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model`), writes train.log, final_model.pt, the artifact and
summary.json into ARTIFACT_DIR (default runs/<RUN_ID>), and prints the challenge's log lines.
"""


# --------------------------------------------------------------------------------------------------
# The command line

def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "submission"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crawler.submission", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output directories, one per seed")
    p.add_argument("--name", required=True, help="the submission's name (submission.json, the folder name)")
    p.add_argument("--author", required=True, help="author's name (submission.json)")
    p.add_argument("--github-id", required=True, help="author's GitHub id (submission.json)")
    p.add_argument("--blurb", default="", help="one paragraph on what the submission does (submission.json)")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="YYYY-MM-DD (default: today)")
    p.add_argument("--track", default=TRACK, help=f"the challenge track (default: {TRACK})")
    p.add_argument("--hardware", default=None,
                   help="what the runs trained on, e.g. '8xH100 80GB SXM' (default: the runs' world size and "
                        "device kind)")
    p.add_argument("--records-dir", default="records",
                   help="where records/track_<track>/<date>_<name>/ goes (default: records)")
    p.add_argument("--tokenizer", default=None,
                   help="the SentencePiece model the submission is scored with, checked against the one the "
                        "artifact was trained with (default: the run's own)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="accept a --tokenizer other than the run's (a deliberate change only)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the same folder")
    return p


def _run_tokenizer(run: Run) -> Path:
    if run.options.get("tokenizer"):
        return Path(run.options["tokenizer"])
    if run.options.get("data_dir"):
        return Path(run.options["data_dir"]) / TOKENIZER_FILE
    raise SetupError(f"run {str(run.path)!r} records no tokenizer path (the built-in corpus): give --tokenizer")


def export(args) -> Path:
    """Check everything, then write the records folder; returns it."""
    train = load_train()
    runs = [read_run(path, train.ARTIFACT_NAME) for path in args.runs]
    seed_variable = {dest: name for name, dest in variables(train.build_parser()).items()}["seed"]
    defaults = [export_defaults(run, train) for run in runs]
    check_same_options(runs, defaults, seed_variable)
    script = train_gpt(defaults[0]).encode("utf-8")
    for run in runs:
        total = run.artifact_bytes + len(script)
        if total > BUDGET_BYTES:
            raise SetupError(f"run {str(run.path)!r}: artifact {run.artifact_bytes:,} B + train_gpt.py "
                             f"{len(script):,} B = {total:,} B is over the {BUDGET_BYTES:,} B budget: "
                             f"quantise with a lower --target-bytes")
        load_checked_tokenizer(args.tokenizer or _run_tokenizer(run), run.config.vocab_size,
                               trained_with=run.tokenizer, allow_mismatch=args.allow_tokenizer_mismatch)
    folder = Path(args.records_dir) / f"track_{args.track}" / f"{args.date}_{_folder_name(args.name)}"
    logs = {f"train_seed{run.seed}.log": run for run in runs}
    with hold_directory_lock(folder, "--records-dir"):
        outputs = dict.fromkeys([*RECORD_FILES, *logs, *(p.name for p in folder.glob("train_seed*.log"))])
        prepare_output_dir(folder, "--records-dir", outputs=outputs, replace=args.overwrite,
                           hint="replace it with --overwrite, or choose another --name or --records-dir")
        modules = counted_modules()
        sizes = {"code": len(script), "source": code_bytes().source}
        info = submission_json(runs, args, len(script))
        write_bytes(folder / "train_gpt.py", script)
        write_json(folder / "submission.json", info)
        write_bytes(folder / "README.md", readme(runs, info, defaults[0], sizes, seed_variable).encode("utf-8"))
        write_bytes(folder / "requirements.txt", requirements(modules.values()).encode("utf-8"))
        for name, run in logs.items():
            write_bytes(folder / name, run.log)
    _print_sizes(runs, modules, len(script), sizes["source"], folder)
    for run in runs:
        if run.counted_code_bytes != len(script):
            print(f"python -m crawler.submission: warning: run {str(run.path)!r} counted {run.counted_code_bytes:,} B "
                  f"of code, this train_gpt.py is {len(script):,} B (the package changed since the run): its "
                  f"train_gpt.py may prune its artifact differently from the run's log", file=sys.stderr)
    return folder


def _print_sizes(runs: list[Run], modules, code: int, source: int, folder: Path) -> None:
    stripped = len(exported_module().encode("utf-8"))
    print(f"code: train_gpt.py {code:,} B as written ({len(modules)} modules: {source:,} B as source files, "
          f"{stripped:,} B stripped; the seed's train_gpt.py {SEED_CODE_BYTES:,} B)")
    print("largest modules (compressed alone): " + ", ".join(f"{n} {b:,} B" for n, b in module_costs()[:6]))
    for run in runs:
        total = run.artifact_bytes + code
        print(f"seed {run.seed}: artifact {run.artifact_bytes:,} B + code {code:,} B = {total:,} B of "
              f"{BUDGET_BYTES:,} B: {'fits' if total <= BUDGET_BYTES else 'OVER'}; {run.score[0]} "
              f"val_bpb {run.score[2]:.8f}")
    print(f"wrote {folder}")


def main(argv=None) -> int:
    """The command line; returns the exit status (2 with one `error:` line for anything it refuses)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        export(args)
        return 0
    return run_main("python -m crawler.submission", body)


if __name__ == "__main__":
    sys.exit(main())
