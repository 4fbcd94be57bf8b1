"""Model registry: ``build_model`` for experts, ``build_router`` for routers.

Every model is called as ``model(x, t, y)`` with x of shape ``(N, *data_shape)``, t of shape
``(N,)`` in [0, 1] and y of shape ``(N,)`` (class labels, ``null_label`` for "no class") or None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ddm.models.dit import DIT_SIZES, DiT, DiTRouter
from ddm.models.mlp import MLP_SIZES, MLPRouter, MLPVelocity
from ddm.models.moe import MoEConfig

__all__ = ["ModelConfig", "MoEConfig", "build_model", "build_router", "forward_flops", "DIT_SIZES", "MLP_SIZES", "DiT", "DiTRouter"]


@dataclass(frozen=True)
class ModelConfig:
    """Which network and for what data.

    arch: a preset name, a DiT size ("DiT-Tiny/2" ... "DiT-XL/2") or an MLP size ("MLP-S", ...).
    data_shape: one sample's shape: (C, H, W) for a DiT, (D,) for an MLP.
    num_classes: 0 for unconditional models; otherwise labels 0..num_classes-1 and a null label.
    class_dropout_prob: label dropout during training, which classifier-free guidance needs
        (the DiT paper uses 0.1).
    """

    arch: str = "DiT-Tiny/2"
    data_shape: tuple[int, ...] = (4, 32, 32)
    num_classes: int = 0
    class_dropout_prob: float = 0.1
    mlp_ratio: float = 4.0
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        if self.arch in DIT_SIZES:
            if len(self.data_shape) != 3 or self.data_shape[1] != self.data_shape[2]:
                raise ValueError(f"data_shape must be (C, H, H) for {self.arch}, got {self.data_shape}")
            patch = DIT_SIZES[self.arch].patch_size
            if self.data_shape[1] % patch:
                raise ValueError(
                    f"data_shape side {self.data_shape[1]} is not divisible by the patch size {patch} of {self.arch}"
                )
        elif self.arch in MLP_SIZES:
            if len(self.data_shape) != 1:
                raise ValueError(f"data_shape must be (D,) for {self.arch}, got {self.data_shape}")
            if self.moe.enabled:
                raise ValueError(f"moe is only supported by DiT models, not {self.arch}")
        else:
            raise ValueError(f"arch {self.arch!r} is unknown; choose one of {sorted(DIT_SIZES) + sorted(MLP_SIZES)}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The velocity model v(x_t, t, y) described by ``cfg``."""
    if cfg.arch in MLP_SIZES:
        return MLPVelocity(MLP_SIZES[cfg.arch], cfg.data_shape[0], cfg.num_classes, cfg.class_dropout_prob)
    c, h, _ = cfg.data_shape
    return DiT(DIT_SIZES[cfg.arch], h, c, cfg.num_classes, cfg.class_dropout_prob, cfg.mlp_ratio, cfg.moe)


def build_router(cfg: ModelConfig, num_partitions: int) -> nn.Module:
    """The router producing logits of p(k | x_t, t, y) over ``num_partitions`` partitions."""
    if cfg.moe.enabled:
        raise ValueError("routers are dense: set moe.num_experts=0 in the router model config")
    if cfg.arch in MLP_SIZES:
        return MLPRouter(MLP_SIZES[cfg.arch], cfg.data_shape[0], num_partitions, cfg.num_classes, cfg.class_dropout_prob)
    c, h, _ = cfg.data_shape
    return DiTRouter(DIT_SIZES[cfg.arch], num_partitions, h, c, cfg.num_classes, cfg.class_dropout_prob, cfg.mlp_ratio)


def forward_flops(cfg: ModelConfig, router: bool = False) -> float:
    """Forward FLOPs of one sample (2 per multiply-add) of ``build_model(cfg)`` (or the router).

    DiT: per block and token 8 D^2 (qkv, proj) + 4 r D^2 (the feed-forward of ratio r; top_k times
    that in MoE blocks, whose tokens each visit top_k experts) + 4 T D (attention), plus the patch
    embedding and output layer; the router's CLS token adds one token. MLP: 2 x the weights of its
    linear layers. Embeddings and adaLN projections (per sample, < 1%) are left out.
    """
    if cfg.arch in MLP_SIZES:
        import torch

        with torch.device("meta"):
            model = build_router(cfg, 2) if router else build_model(cfg)
        return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    size = DIT_SIZES[cfg.arch]
    c, h, _ = cfg.data_shape
    tokens = (h // size.patch_size) ** 2 + (1 if router else 0)
    d, r = size.hidden_size, cfg.mlp_ratio
    total = 0.0
    for i in range(size.depth):
        moe_block = cfg.moe.enabled and not router and (size.depth - 1 - i) % cfg.moe.every == 0
        ffn = 4 * r * d**2 * (cfg.moe.top_k if moe_block else 1)
        total += tokens * (8 * d**2 + ffn) + 4 * tokens**2 * d
    return float(total + 2 * 2 * (h // size.patch_size) ** 2 * size.patch_size**2 * c * d)
