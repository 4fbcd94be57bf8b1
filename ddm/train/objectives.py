"""One objective per job kind: the loss of a model on one micro-batch.

The training loop (``ddm.train.trainer``) and the mixture demo call an objective the same way,
``objective(model, batch, generator)``, with ``batch = {"x", "y", "partition"}`` (``y`` is None
for unconditional models). The job kind chooses the objective (``OBJECTIVES``); the loop does not
branch on it.

- ``VelocityLoss`` (experts, the monolith): flow matching, |v(x_t, t, y) - d/dt x_t|^2, plus the
  MoE load-balancing loss when the model has MoE layers.
- ``RouterLoss`` (the router): cross-entropy of p(k | x_t, t, y) against each sample's partition,
  on noised samples of all the data.
- ``DistillLoss`` (a distilled student): |v(x_t, t, y) - v_teacher(x_t, t, y)|^2, the teacher
  being the expert of each sample's partition.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ddm.models.flow import FlowMatching

Batch = dict[str, torch.Tensor | None]


class VelocityLoss:
    def __init__(self, flow: FlowMatching, moe_aux_coef: float = 0.0):
        self.flow, self.moe_aux_coef = flow, moe_aux_coef

    def __call__(self, model: Callable, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        losses = self.flow.training_losses(model, batch["x"], batch["y"], generator=generator)
        loss = losses["loss"].mean()
        if "moe_aux" in losses:
            loss = loss + self.moe_aux_coef * losses["moe_aux"]
        return loss


class RouterLoss:
    def __init__(self, flow: FlowMatching):
        self.flow = flow

    def __call__(self, model: Callable, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x_t, t = self.flow.noised(batch["x"], generator)
        return F.cross_entropy(model(x_t, t, batch["y"]).float(), batch["partition"])


class DistillLoss:
    """``teacher(x_t, t, y, partition)`` gives the teacher's velocity. Labels are dropped to the
    null label here, once for teacher and student alike, so the student keeps classifier-free
    guidance; the student's own label dropout must be off (``dropout_prob`` is read here: the
    class or the caption dropout). A dropped caption is marked (``TextEmbedding.drop``), not
    replaced: the student and each expert of the teacher put their own learned null caption there."""

    def __init__(self, flow: FlowMatching, teacher: Callable, num_classes: int, dropout_prob: float):
        self.flow, self.teacher = flow, teacher
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def __call__(self, model: Callable, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x_t, t = self.flow.noised(batch["x"], generator)
        y = batch["y"]
        if y is not None and self.dropout_prob > 0:
            drop = torch.rand(len(y), device=x_t.device) < self.dropout_prob
            if isinstance(y, torch.Tensor):
                y = torch.where(drop, torch.full_like(y, self.num_classes), y)  # the null label
            else:  # captions (TextEmbedding)
                y = dataclasses.replace(y, drop=drop)
        with torch.no_grad():
            # The partitions as the reader gave them, on the host: the teacher routes without a device read.
            v_teacher = self.teacher(x_t, t, y, batch.get("partition_host", batch["partition"]))
        return (model(x_t, t, y).float() - v_teacher.float()).pow(2).mean()
