"""QAT while training (docs/math.md §2): which weights are fake-quantised and on which grid
(`qat_small_numel`, `qat_bits`, `qat_mlp_bits`), and when QAT switches on: from step 0, or late, once the
LR multiplier of a step is at most `late_qat_threshold` (the seed's LATE_QAT_THRESHOLD). Once on it
stays on for the rest of training. The log lines are the seed's (`qat:enabled from step 0 attn=6bit`,
`qat:late_start threshold=...`, `late_qat:activated at step N scale=... threshold=...`)."""
from __future__ import annotations

from collections.abc import Callable

from ..model import CastedLinear, CrawlerGPT
from .config import TrainConfig


class QATSwitch:
    """QAT of one training run on `model`: configures which weights it acts on, switches it on when the
    schedule says so and logs its state. `active` is whether QAT is on now (a checkpoint records it)."""

    def __init__(self, tc: TrainConfig, model: CrawlerGPT):
        self.tc, self.model = tc, model
        self.weights = model.configure_qat(bits=tc.qat_bits, mlp_bits=tc.qat_mlp_bits, small_numel=tc.qat_small_numel)
        self.linears = sum(isinstance(m, CastedLinear) for m in model.modules())
        self.set_active(tc.qat and tc.late_qat_threshold >= 1.0)

    def set_active(self, active: bool) -> None:
        """Switch QAT on or off in the model (a resumed run restores the checkpoint's state)."""
        self.active = active
        self.model.set_qat(active)

    def describe(self) -> list[str]:
        """The log lines stating QAT's state at the start of training."""
        tc = self.tc
        if not tc.qat:
            return ["qat:disabled"]
        grid = f"attn={tc.qat_bits}bit" + (f", MLP={tc.qat_mlp_bits}bit" if tc.qat_mlp_bits else "")
        state = (f"qat:enabled from step 0 {grid}" if tc.late_qat_threshold >= 1.0
                 else f"qat:late_start threshold={tc.late_qat_threshold} {grid}")
        if self.active and tc.late_qat_threshold < 1.0:
            state += " (on: restored from the checkpoint)"
        if self.weights == 0:
            return [state, f"qat: no Linear weight has more than {tc.qat_small_numel:,} elements, so QAT changes "
                           f"nothing; lower --qat-small-numel (0 = every Linear)"]
        return [state, f"qat: fake-quantises {self.weights} of {self.linears} Linear weights (those with more than "
                       f"{tc.qat_small_numel:,} elements)"]

    def update(self, step: int, multiplier: float, log: Callable[[str], None]) -> None:
        """Before step `step` runs at LR `multiplier`: switch late QAT on once multiplier <= threshold."""
        if self.tc.qat and not self.active and multiplier <= self.tc.late_qat_threshold:
            self.set_active(True)
            log(f"late_qat:activated at step {step} scale={multiplier:.4f} threshold={self.tc.late_qat_threshold}")
