"""What a resumed run restores: the options the run was started with (recorded in its checkpoint under
RUN_OPTIONS_KEY), the ones given again on the command line (they win, and are logged as such), and
which changes make the resumed run differ from the uninterrupted one (those are named).

A resume on the same machine with no option changed (the same world size, thread count and ops) trains
bit-identically to the uninterrupted run (docs/math.md §2); `option_changes` names every option whose
change breaks that.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Collection

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
