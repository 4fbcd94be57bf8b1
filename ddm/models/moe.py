"""Mixture-of-experts feed-forward layer: DeepSpeed's ``deepspeed.moe.layer.MoE``.

These "MoE experts" live inside one DDM expert (one island) and are unrelated to the
K DDM experts, which never communicate. With ``ep_size > 1`` DeepSpeed shards the MoE experts
over ranks and exchanges tokens with all-to-all.
"""

from __future__ import annotations

import torch
from torch import nn

from ddm.distributed.parallel import ensure_process_group, load_deepspeed
from ddm.models.config import MoEConfig
from ddm.models.layers import Mlp


class MoEFeedForward(nn.Module):
    """Drop-in replacement for :class:`Mlp` whose experts are DeepSpeed MoE experts.

    ``forward`` returns only the tokens; the load-balancing loss of the latest forward is kept in
    ``aux_loss`` so the model's signature stays that of a dense DiT.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int, cfg: MoEConfig):
        super().__init__()
        load_deepspeed()  # deferred: DeepSpeed is only needed when MoE is on
        from deepspeed.moe.layer import MoE

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
