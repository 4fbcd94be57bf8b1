"""Exponential moving average of model weights (the paper samples from the EMA, decay 0.9999)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = d * shadow + (1 - d) * weights`` after every ``update``.

    With ``warmup`` the decay ramps as d = min(decay, (1 + n) / (10 + n)) over the first updates
    (n = updates so far), so a short run's EMA is not dominated by the initial weights; long runs
    reach the configured decay after a few thousand steps. Buffers are copied, not averaged.
    The shadow model is what gets exported and sampled.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # fp32 shadow even when training in bf16: averaging in low precision loses the small updates.
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for shadow, param in zip(self.model.parameters(), model.parameters()):
            shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - d)
        for shadow, buf in zip(self.model.buffers(), model.buffers()):
            shadow.copy_(buf)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
