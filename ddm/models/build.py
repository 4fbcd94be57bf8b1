"""The model registry: ``build_model`` for velocity models, ``build_router`` for routers."""

from __future__ import annotations

import torch
from torch import nn

from ddm.models.config import DIT_SIZES, MLP_SIZES, MMDIT_SIZES, ModelConfig, TextConfig
from ddm.models.dit import DiT, DiTRouter
from ddm.models.mlp import MLPRouter, MLPVelocity
from ddm.models.mmdit import MMDiT, MMDiTRouter
from ddm.models.text_dit import TextDiT, TextDiTRouter


def build_model(cfg: ModelConfig) -> nn.Module:
    """The velocity model v(x_t, t, y) described by ``cfg``."""
    if cfg.arch in MLP_SIZES:
        return MLPVelocity(MLP_SIZES[cfg.arch], cfg.data_shape[0], cfg.num_classes, cfg.class_dropout_prob)
    c, h, _ = cfg.data_shape
    if cfg.arch in MMDIT_SIZES:
        t = cfg.text
        return MMDiT(MMDIT_SIZES[cfg.arch], h, c, t.dim, t.length, t.caption_dropout_prob, cfg.mlp_ratio, t.pooled)
    size = DIT_SIZES[cfg.arch]
    if cfg.text.enabled:
        t = cfg.text
        return TextDiT(size, h, c, t.dim, t.length, t.caption_dropout_prob, cfg.mlp_ratio, cfg.moe, t.pooled)
    return DiT(
        size,
        h,
        c,
        cfg.num_classes,
        cfg.class_dropout_prob,
        cfg.mlp_ratio,
        cfg.moe,
        cfg.time_freq_shift,
        cfg.learn_sigma,
    )


def build_router(cfg: ModelConfig, num_partitions: int) -> nn.Module:
    """The router producing logits of p(k | x_t, t, y) over ``num_partitions`` partitions."""
    if cfg.moe.enabled:
        raise ValueError("routers are dense: set moe.num_experts=0 in the router model config")
    if cfg.arch in MMDIT_SIZES:
        c, h, _ = cfg.data_shape
        t = cfg.text
        return MMDiTRouter(
            MMDIT_SIZES[cfg.arch],
            num_partitions,
            h,
            c,
            t.dim,
            t.length,
            t.caption_dropout_prob,
            cfg.mlp_ratio,
            t.pooled,
        )
    if cfg.text.enabled:
        c, h, _ = cfg.data_shape
        t = cfg.text
        size = DIT_SIZES[cfg.arch]
        return TextDiTRouter(
            size, num_partitions, h, c, t.dim, t.length, t.caption_dropout_prob, cfg.mlp_ratio, t.pooled
        )
    if cfg.arch in MLP_SIZES:
        return MLPRouter(
            MLP_SIZES[cfg.arch], cfg.data_shape[0], num_partitions, cfg.num_classes, cfg.class_dropout_prob
        )
    c, h, _ = cfg.data_shape
    size = DIT_SIZES[cfg.arch]
    return DiTRouter(
        size, num_partitions, h, c, cfg.num_classes, cfg.class_dropout_prob, cfg.mlp_ratio, cfg.time_freq_shift
    )


def preset_table() -> str:
    """The model presets with their parameter counts (``ddm models``)."""
    lines = [f"{'preset':<12}{'params':>10}  shape"]
    for name in list(DIT_SIZES) + list(MLP_SIZES):
        dit = name in DIT_SIZES
        with torch.device("meta"):  # counts without allocating XL's 675M parameters
            model = build_model(ModelConfig(name, (4, 32, 32) if dit else (2,), num_classes=1000 if dit else 0))
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"{name:<12}{n / 1e6:>9.2f}M  {'32x32x4 latents, 1000 classes' if dit else '2-D points'}")
    t5 = TextConfig(encoder="google/t5-v1_1-xl", dim=2048, length=120)  # the paper's MMDiT experts' text encoder
    for name in MMDIT_SIZES:
        with torch.device("meta"):
            model = build_model(ModelConfig(name, (4, 32, 32), text=t5))
        n = sum(p.numel() for p in model.parameters())
        lines.append(f"{name:<12}{n / 1e6:>9.2f}M  32x32x4 latents, T5-XL captions (120 x 2048)")
    return "\n".join(lines)
