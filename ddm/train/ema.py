"""Exponential moving average of model weights (the paper samples from the EMA, decay 0.9999)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = d * shadow + (1 - d) * weights`` after every ``update``.

    With ``warmup`` the decay ramps as d = min(decay, (1 + n) / (10 + n)) over the first updates
    (n = updates so far), so a short run's EMA is not dominated by the initial weights; long runs
    reach the configured decay after a few thousand steps. The shadow is a dict of fp32 tensors
    keyed like ``named_parameters()`` (even when training in bf16: averaging in low precision
    loses the small updates); it holds no module, so models with process-group handles (MoE) work.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        names, params = zip(*model.named_parameters())
        shadows = [self.shadow[n] for n in names]
        # One fused multi-tensor lerp instead of a Python loop over every parameter.
        torch._foreach_lerp_(shadows, [p.detach().to(torch.float32) for p in params], 1.0 - d)
        self.num_updates += 1

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every parameter replaced by its average (buffers as they are)."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        state.update(self.shadow)
        return state

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (in place) and return it in eval mode."""
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])
        return model.eval()

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        # Checkpoints hold CPU tensors; the shadow stays on the device of the weights it averages.
        self.shadow = {k: state["shadow"][k].to(self.shadow[k].device, torch.float32).clone() for k in self.shadow}
        self.num_updates = int(state["num_updates"])
