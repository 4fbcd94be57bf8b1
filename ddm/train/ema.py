"""Exponential moving average of model weights (the paper samples from the EMA, decay 0.9999).

Under ZeRO-3 the EMA is sharded as the model is: each rank averages only its partition of each
parameter (DeepSpeed's ``param.ds_tensor``: the flattened parameter split into equal, end-padded
pieces, piece r on rank r), from the local shards, with no collective in the step. Only an export
gathers it (``weights``), to rank 0. Under ZeRO 0-2 every rank holds the whole EMA.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _span(p: nn.Parameter) -> tuple[int, int, int]:
    """A ZeRO-3 parameter's shard: (start in the flattened parameter, real elements, shard size).
    Padding sits at the end of the flattened parameter: a rank may hold a partly or wholly padded
    shard. DeepSpeed leaves the padding uninitialised, so it is never averaged."""
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=p.ds_process_group)
    return start, max(0, min(size, p.ds_numel - start)), size


class EMA:
    """Keeps ``shadow = d * shadow + (1 - d) * weights`` after every ``update``.

    With ``warmup`` the decay ramps as d = min(decay, (1 + n) / (10 + n)) over the first updates
    (n = updates so far), so a short run's EMA is not dominated by the initial weights; long runs
    reach the configured decay after a few thousand steps. The shadow is a dict of fp32 tensors
    keyed like ``named_parameters()`` (even when training in bf16: averaging in low precision
    loses the small updates); it holds no module, so models with process-group handles (MoE) work.
    Under ZeRO-3 (``sharded``) each entry is this rank's shard, padding zero.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.from_portable = False  # set when a reshard restored the shards (ddm.checkpoint.reshard)
        self.spans: dict[str, tuple[int, int, int]] = {}  # ZeRO-3 parameters: _span
        self.shapes: dict[str, torch.Size] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in model.named_parameters():
                if hasattr(p, "ds_tensor"):
                    if dist.get_world_size(p.ds_process_group) != dist.get_world_size():
                        raise ValueError(f"{name} is partitioned over a subgroup: the EMA shards over every rank")
                    start, n, size = self.spans[name] = _span(p)
                    self.shapes[name] = torch.Size(p.ds_shape)
                    shard = torch.zeros(size, dtype=torch.float32, device=p.ds_tensor.device)
                    shard[:n].copy_(p.ds_tensor.detach()[:n])
                    self.shadow[name] = shard
                else:
                    self.shadow[name] = p.detach().float().clone()

    @property
    def sharded(self) -> bool:
        return bool(self.spans)

    def elements(self) -> int:
        """fp32 elements this rank holds."""
        return sum(t.numel() for t in self.shadow.values())

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """From the weights as this rank holds them: whole (ZeRO 0-2) or its shards (ZeRO-3; read
        afresh each time, since DeepSpeed re-points ``ds_tensor`` after a step)."""
        d = self.current_decay()
        shadows, weights = [], []
        for name, p in model.named_parameters():
            if name in self.spans:
                n = self.spans[name][1]
                if n:
                    shadows.append(self.shadow[name][:n])
                    weights.append(p.ds_tensor.detach()[:n].to(torch.float32))
            else:
                shadows.append(self.shadow[name])
                weights.append(p.detach().to(torch.float32))
        # One fused multi-tensor lerp instead of a Python loop over every parameter (a ZeRO-3 rank
        # may hold nothing but padding: then there is nothing to average).
        if shadows:
            torch._foreach_lerp_(shadows, weights, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def whole(self) -> dict[str, torch.Tensor]:
        """The whole averaged parameters: under ZeRO-3 a collective that every rank calls, whose
        result only rank 0 holds (the other ranks get the parameters they hold whole: none)."""
        if not self.sharded:
            return dict(self.shadow)
        out = {}
        main = dist.get_rank() == 0
        for name, shard in self.shadow.items():
            if name not in self.spans:
                out[name] = shard
                continue
            group = None  # the ZeRO-3 partition group: every rank (ddm's jobs shard over all of them)
            world = dist.get_world_size(group)
            flat = torch.empty(shard.numel() * world, dtype=shard.dtype, device=shard.device) if main else None
            dist.gather(shard, list(flat.chunk(world)) if main else None, dst=0, group=group)
            if main:
                out[name] = flat[: self.shapes[name].numel()].view(self.shapes[name])
        return out

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with every parameter replaced by its average (buffers as they are).
        Every rank calls it (a collective under ZeRO-3); under ZeRO-3 only rank 0's is complete."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        state.update(self.whole())
        return state

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (in place; ZeRO 0-2) and return it in eval mode."""
        if self.sharded:
            raise ValueError("apply_to needs whole weights: under ZeRO-3 export with weights() instead")
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])
        return model.eval()

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """This rank's shadow from a checkpoint: its own entries, or (ZeRO-3) whole parameters, of
        which it keeps its shard (checkpoints written before the EMA was sharded)."""
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for name, mine in self.shadow.items():
            saved = state["shadow"][name]
            if name in self.spans and saved.shape == self.shapes[name]:
                self.load_whole(name, saved)
            elif saved.shape != mine.shape:
                raise ValueError(f"EMA state of {name} has shape {tuple(saved.shape)}, this job {tuple(mine.shape)}")
            else:
                mine.copy_(saved.to(mine.device, torch.float32))  # the shadow stays on its weights' device
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def load_whole(self, name: str, whole: torch.Tensor) -> None:
        """Set one parameter's average from its whole tensor (a ZeRO-3 rank keeps its shard)."""
        mine = self.shadow[name]
        if name not in self.spans:
            mine.copy_(whole.to(mine.device, torch.float32).reshape(mine.shape))
            return
        start, n, _ = self.spans[name]
        mine.zero_()[:n].copy_(whole.reshape(-1)[start : start + n].to(mine.device, torch.float32))
