"""Mixture-of-experts feed-forward layer: DeepSpeed's ``deepspeed.moe.layer.MoE``.

These "MoE experts" live inside one DDM expert (one island) and are unrelated to the
K DDM experts, which never communicate. With ``ep_size > 1`` DeepSpeed shards the MoE experts
over ranks and exchanges tokens with all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ddm.models.layers import Mlp


@dataclass(frozen=True)
class MoEConfig:
    """MoE feed-forward settings of a DiT.

    num_experts: MoE experts per MoE layer (0 disables MoE).
    every: every ``every``-th block (counting from the last) uses an MoE feed-forward;
        1 makes all blocks MoE, 2 alternates dense and MoE as in GShard / Switch.
    top_k: experts per token, 1 or 2 (DeepSpeed's TopKGate supports these).
    ep_size: expert-parallel degree; must divide num_experts and the world size.
    capacity_factor: token capacity per expert relative to an even split; tokens beyond it are
        dropped (their feed-forward output is zero, the residual passes them through).
    aux_loss_coef: weight of the load-balancing loss added to the training objective.
    """

    num_experts: int = 0
    every: int = 2
    top_k: int = 1
    ep_size: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if not self.enabled:
            return
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 (DeepSpeed TopKGate), got {self.top_k}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(
                f"ep_size={self.ep_size} must divide num_experts={self.num_experts}"
            )
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("capacity_factor and eval_capacity_factor must be > 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


class MoEFeedForward(nn.Module):
    """Drop-in replacement for :class:`Mlp` whose experts are DeepSpeed MoE experts.

    ``forward`` returns only the tokens; the load-balancing loss of the latest forward is kept in
    ``aux_loss`` so the model's signature stays that of a dense DiT.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int, cfg: MoEConfig):
        super().__init__()
        from deepspeed.moe.layer import MoE  # deferred: DeepSpeed is only needed when MoE is on

        from ddm.parallel import ensure_process_group

        ensure_process_group()  # DeepSpeed creates its expert-parallel groups on this
        self.moe = MoE(
            hidden_size=hidden_size,
            expert=Mlp(hidden_size, mlp_hidden),
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            min_capacity=cfg.min_capacity,
            drop_tokens=cfg.drop_tokens,
            # Random token selection makes dropping depend on an RNG stream DeepSpeed owns;
            # keep routing a pure function of the input so resumes replay exactly.
            use_rts=False,
        )
        self.aux_loss: torch.Tensor = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, aux_loss, _counts = self.moe(x)
        self.aux_loss = aux_loss
        return out
