"""Weight averaging at the end of training (docs/math.md §2): SWA, the uniform mean of snapshots taken
on the trainer's schedule, and EMA, an exponential moving average updated every step. Both keep their
sums in float32 and return state dicts in the model's own dtypes."""
from __future__ import annotations

import torch
import torch.nn as nn


class WeightAverager:
    """SWA: the uniform mean of model snapshots, summed in float32 on the CPU (so it costs no device
    memory). `average()` returns a state dict in the model's dtypes."""

    def __init__(self):
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}

    def collect(self, model: nn.Module) -> None:
        for name, t in model.state_dict().items():
            t = t.detach().to("cpu", torch.float32)
            if name in self.sums:
                self.sums[name] += t
            else:
                self.sums[name] = t.clone()
        self.count += 1

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("WeightAverager: no snapshot collected")
        return {name: (self.sums[name] / self.count).to(t.dtype) for name, t in like.items()}

    def state_dict(self) -> dict:
        return {"count": self.count, "sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.sums = int(state["count"]), dict(state["sums"])


class EMA:
    """Exponential moving average of the weights, float32 on the model's device:
    `ema = d·ema + (1 - d)·w` after every step."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, t in model.state_dict().items():
            self.shadow[name].mul_(self.decay).add_(t.detach().float(), alpha=1.0 - self.decay)

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.shadow[name].to(t.dtype) for name, t in like.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}
