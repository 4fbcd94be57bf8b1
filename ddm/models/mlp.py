"""MLP velocity model and router for low-dimensional data (the mixture demo, analytic tests)."""

from __future__ import annotations

import torch
from torch import nn

from ddm.models.config import MLPSize
from ddm.models.layers import LabelEmbedder, TimestepEmbedder


class ResBlock(nn.Module):
    """Pre-norm residual MLP block, FiLM-conditioned on (t, y)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.film = nn.Linear(hidden_size, 2 * hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.film(c).chunk(2, dim=1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class _MLPTrunk(nn.Module):
    def __init__(self, dim: int, size: MLPSize, num_classes: int, class_dropout_prob: float):
        super().__init__()
        if dim < 1:
            raise ValueError(f"data dimension must be >= 1, got {dim}")
        self.dim = dim
        self.num_classes = num_classes
        hidden = size.hidden_size
        self.x_proj = nn.Linear(dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden, frequency_embedding_size=64)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(size.depth))
        self.norm_out = nn.LayerNorm(hidden)

    @property
    def null_label(self) -> int:
        if self.y_embedder is None:
            raise ValueError("this model is unconditional (num_classes=0): it has no null label")
        return self.y_embedder.null_label

    def features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected inputs of shape (N, {self.dim}), got {tuple(x.shape)}")
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels y")
            c = c + self.y_embedder(y, self.training)
        h = self.x_proj(x) + c
        for block in self.blocks:
            h = block(h, c)
        return self.norm_out(h)  # (N, hidden)

    @property
    def moe_aux_loss(self) -> torch.Tensor:
        return torch.zeros(())


class MLPVelocity(_MLPTrunk):
    """Velocity model v(x_t, t, y): (N, D) -> (N, D)."""

    def __init__(self, size: MLPSize, dim: int, num_classes: int = 0, class_dropout_prob: float = 0.1):
        super().__init__(dim, size, num_classes, class_dropout_prob)
        self.out = nn.Linear(size.hidden_size, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.out(self.features(x, t, y))


class MLPRouter(_MLPTrunk):
    """Router logits for p(k | x_t, t, y): (N, D) -> (N, K)."""

    def __init__(
        self, size: MLPSize, dim: int, num_partitions: int, num_classes: int = 0, class_dropout_prob: float = 0.1
    ):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        super().__init__(dim, size, num_classes, class_dropout_prob)
        self.num_partitions = num_partitions
        self.head = nn.Linear(size.hidden_size, num_partitions)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, t, y))
