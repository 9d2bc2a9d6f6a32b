"""The progressive crawler-loop schedule (the seed's PROGRESSIVE_SCHEDULE, docs/math.md §2): how many of
the model's crawler loops each training step runs.

`TrainConfig.progressive_schedule` is "STEP:LOOPS,...": training starts with 1 crawler loop and runs LOOPS
loops from step STEP on (STEP counts the steps already done, so "2000:2" switches after the 2000th step,
as the seed does). Every variant is compiled during the compile warm-up, checkpoints record the step, and
a resumed run takes up the variant of its step.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import SetupError


def parse_switches(text: str) -> tuple[tuple[int, int], ...]:
    """"STEP:LOOPS,..." -> ((step, loops), ...) sorted by step; "" -> (). SetupError for anything else
    (a step < 0, loops < 1, a step given twice)."""
    if not text.strip():
        return ()
    switches = []
    for entry in text.split(","):
        step, sep, loops = entry.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            switches.append((int(step), int(loops)))
        except ValueError:
            raise SetupError(f"progressive_schedule {text!r}: expected 'STEP:LOOPS,...' with integers, e.g. "
                             f"'2000:2', got entry {entry.strip()!r}") from None
    switches.sort()
    steps = [s for s, _ in switches]
    if any(s < 0 for s in steps) or any(loops < 1 for _, loops in switches) or len(set(steps)) != len(steps):
        raise SetupError(f"progressive_schedule {text!r}: steps must be >= 0 and distinct, loops >= 1")
    return tuple(switches)


@dataclass(frozen=True)
class LoopSchedule:
    """The loops each step runs: `full` (the model's crawler_loops) throughout when `switches` is empty;
    else 1 until the first switch and `loops` from each (step, loops) switch on. A switch at step 0 sets
    the starting count (the seed ignores one there and starts with 1)."""
    switches: tuple[tuple[int, int], ...]
    full: int

    @classmethod
    def parse(cls, text: str, crawler_loops: int) -> LoopSchedule:
        """The schedule of `text` for a model with `crawler_loops` loops; SetupError if malformed or if a
        switch asks for more loops than the model has."""
        switches = parse_switches(text)
        too_many = [loops for _, loops in switches if loops > crawler_loops]
        if too_many:
            raise SetupError(f"progressive_schedule {text!r}: the model has {crawler_loops} crawler loop(s), "
                             f"the schedule asks for {max(too_many)}")
        return cls(switches, crawler_loops)

    @property
    def enabled(self) -> bool:
        return bool(self.switches)

    def loops_at(self, step: int) -> int:
        """Crawler loops of the step that follows `step` completed steps."""
        if not self.switches:
            return self.full
        loops = 1
        for switch_step, switch_loops in self.switches:
            if switch_step <= step:
                loops = switch_loops
        return loops

    def variants(self) -> list[int]:
        """Every loop count the run uses, in the order it first runs."""
        out = [self.loops_at(0)]
        for _, loops in self.switches:
            if loops not in out:
                out.append(loops)
        return out
