"""The caption conditioning of a text DiT, and its parameter and FLOP counts, without torch (a part
of ``ddm.models.config``, which re-exports these names)."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Protocol

IN_STORE = "store:"  # "store:<folder>": a folder inside the store of the job, ensemble or dataset


def in_store(spec: str, store: str | None) -> str:
    """Where ``spec`` is: a ``store:<folder>`` name resolved against ``store`` (the URL of the store
    that names it), any other spec as it is. Names of this kind travel with the store: an ensemble
    copied to another URL finds its encoder at the new one."""
    if not spec.startswith(IN_STORE):
        return spec
    folder = spec[len(IN_STORE) :].strip("/")
    if not folder or ".." in folder.split("/"):
        raise ValueError(f"text encoder {spec!r}: give a folder inside the store, e.g. store:text_encoder")
    if not store:
        raise ValueError(f"text encoder {spec!r} names a folder in a store, and no store was given to find it in")
    scheme, sep, path = store.partition("://")
    if sep:
        return f"{scheme}://{posixpath.join(path, folder)}"
    if store.endswith(":"):  # "memory:", the root of fsspec's memory store as a Store names it
        return f"{store}//{folder}"
    return os.path.join(os.path.abspath(os.path.expanduser(store)), folder)  # absolute: never read as a hub id


class DiTSize(Protocol):  # ddm.models.config.DiTSize (which imports this module)
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


class MoEConfig(Protocol):  # ddm.models.config.MoEConfig
    num_experts: int
    every: int
    top_k: int

    @property
    def enabled(self) -> bool: ...


@dataclass(frozen=True)
class TextConfig:
    """The caption conditioning of a text-conditioned DiT (``ddm.models.text_dit``); off while
    ``encoder`` is empty.

    encoder: the frozen text encoder, a hub id with its revision (``openai/clip-vit-large-patch14@<rev>``),
        a folder or store URL holding a saved one (``ddm.models.text_encoder``), or ``store:<folder>``,
        a folder inside the job's own store (found wherever the store is, also after it is moved).
    dim, length: the width of its token embeddings and the tokens per caption (its max_length);
        the model's input size, checked against the encoder before any worker starts (CLIP-L:
        768 and 77; T5-XL: 2048 and 120).
    pooled: add the encoder's pooled vector to the timestep embedding.
    caption_dropout_prob: captions replaced by the learned null caption in training (classifier-free
        guidance needs it; PixArt-alpha uses 0.1).
    embeddings: where the caption embeddings come from: ``job`` (each rank runs the frozen encoder
        on its micro-batches) or ``store`` (computed once at ingest with ``text_encoder=``, read
        with the images; no encoder in the job).
    """

    encoder: str = ""
    dim: int = 0
    length: int = 0
    pooled: bool = True
    caption_dropout_prob: float = 0.1
    embeddings: str = "job"  # job: encoded in the training job; store: computed at ingest (text_encoder=)

    @property
    def enabled(self) -> bool:
        return bool(self.encoder)

    def __post_init__(self) -> None:
        if self.encoder and (self.dim < 1 or self.length < 1):
            raise ValueError(
                f"model.text.encoder={self.encoder!r} needs model.text.dim and model.text.length (its embedding "
                "width and tokens per caption; CLIP-L: 768 and 77)"
            )
        if not 0.0 <= self.caption_dropout_prob < 1.0:
            raise ValueError(f"caption_dropout_prob must be in [0, 1), got {self.caption_dropout_prob}")
        if self.embeddings not in ("job", "store"):
            raise ValueError(f"model.text.embeddings must be job or store, got {self.embeddings!r}")
        if self.embeddings == "store" and not self.encoder:
            raise ValueError("model.text.embeddings=store needs model.text.encoder (the encoder that made them)")


def text_dit_params(size: DiTSize, input_size: int, in_channels: int, text: TextConfig, mlp_ratio: float = 4.0) -> int:
    """The parameter count of ``ddm.models.text_dit.TextDiT`` (dense), from its layout."""
    d, p, e, pooled = size.hidden_size, size.patch_size, text.dim, text.pooled
    hid = int(d * mlp_ratio)
    embed = p * p * in_channels * d + d  # patch embedding
    time = 256 * d + d + d * d + d + d * 6 * d + 6 * d  # timestep MLP + t_block
    captions = (e * d + d + d * d + d) * (2 if pooled else 1) + text.length * e + (e if pooled else 0)
    # self-attention's qkv and proj, cross-attention's q, kv and proj
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)
    block += d * hid + hid + hid * d + d + 6 * d  # MLP, scale_shift_table
    final = 2 * d + d * p * p * in_channels + p * p * in_channels
    return embed + time + captions + size.depth * block + final


def text_dit_forward_flops(size: DiTSize, input_size: int, in_channels: int, text: TextConfig, mlp_ratio: float = 4.0,
                           moe: MoEConfig | None = None, num_partitions: int | None = None) -> float:  # fmt: skip
    """Forward FLOPs of one sample of a text DiT (2 per multiply-add), every matrix product: with T
    patch tokens and L caption tokens of width E, the patch embedding (T p^2 C D), the timestep MLP
    (256 D + D^2) and t_block (6 D^2), the caption MLP (L (E D + D^2)) and the pooled one
    (E D + D^2), per block self-attention (4 T D^2 + 2 T^2 D), cross-attention (2 T D^2 + 2 L D^2
    + 2 T L D) and the feed-forward (2 T D H; MoE blocks: top_k times that plus the gate's T D E),
    and the output linear (T D p^2 C). A router (``num_partitions`` K) has T + 1 tokens (its CLS)
    and a head of D K on the CLS token instead."""
    d, p, L, e = size.hidden_size, size.patch_size, text.length, text.dim
    patches, hid = (input_size // p) ** 2, int(d * mlp_ratio)
    tokens = patches + (1 if num_partitions else 0)
    macs = patches * p * p * in_channels * d + 256 * d + d * d + 6 * d * d
    macs += L * (e * d + d * d) + ((e * d + d * d) if text.pooled else 0)
    for i in range(size.depth):
        moe_block = moe is not None and moe.enabled and (size.depth - 1 - i) % moe.every == 0
        macs += 4 * tokens * d * d + 2 * tokens**2 * d + 2 * tokens * d * d + 2 * L * d * d + 2 * tokens * L * d
        macs += 2 * tokens * d * hid * (moe.top_k if moe_block else 1)
        macs += tokens * d * moe.num_experts if moe_block else 0  # the gate
    macs += d * num_partitions if num_partitions else patches * d * p * p * in_channels
    return 2.0 * macs


@dataclass(frozen=True)
class MMDiTSize:
    """An MMDiT (``ddm.models.mmdit``): ``double`` double-stream blocks, then ``single`` single-stream ones."""

    double: int
    single: int
    hidden_size: int
    num_heads: int
    patch_size: int

    @property
    def depth(self) -> int:
        return self.double + self.single


# Text-to-image only. MMDiT-3B/2: the paper's scale-up experts (hidden 2560, depth 30; the paper gives
# no split between double- and single-stream blocks: 8 + 22 here, FLUX's proportion of about 1 : 2.5)
# at 3.06B parameters with T5-XL text on 32x32x4 latents; the tiny sizes train on 2 CPU cores.
MMDIT_SIZES: dict[str, MMDiTSize] = {
    "MMDiT-Tiny/2": MMDiTSize(double=1, single=1, hidden_size=64, num_heads=2, patch_size=2),
    "MMDiT-Tiny/4": MMDiTSize(double=1, single=1, hidden_size=64, num_heads=2, patch_size=4),
    "MMDiT-3B/2": MMDiTSize(double=8, single=22, hidden_size=2560, num_heads=20, patch_size=2),
}


def mmdit_params(size: MMDiTSize, input_size: int, in_channels: int, text: TextConfig, mlp_ratio: float = 4.0,
                 num_partitions: int | None = None) -> int:  # fmt: skip
    """The parameter count of ``ddm.models.mmdit.MMDiT`` (or its router, ``num_partitions`` K), from its layout."""
    d, p, e, pooled = size.hidden_size, size.patch_size, text.dim, text.pooled
    hid, out = int(d * mlp_ratio), p * p * in_channels
    embed = out * d + d  # patch embedding
    time = 256 * d + d + d * d + d + d * 6 * d + 6 * d  # timestep MLP + t_block
    captions = (e * d + d + d * d + d) * (2 if pooled else 1) + text.length * e + (e if pooled else 0)
    stream = (3 * d * d + 3 * d) + (d * d + d) + (d * hid + hid + hid * d + d) + 6 * d  # qkv, proj, MLP, table
    single = d * (3 * d + hid) + 3 * d + hid + (d + hid) * d + d + 3 * d  # linear1, linear2, table
    head = d * num_partitions + num_partitions + d if num_partitions else d * out + out  # (+ the router's CLS)
    return embed + time + captions + size.double * 2 * stream + size.single * single + 2 * d + head


def mmdit_forward_flops(size: MMDiTSize, input_size: int, in_channels: int, text: TextConfig, mlp_ratio: float = 4.0,
                        num_partitions: int | None = None) -> float:  # fmt: skip
    """Forward FLOPs of one sample of an MMDiT (2 per multiply-add), every matrix product: with T
    image tokens (T + 1 with a router's CLS) and L caption tokens, S = T + L, the inputs as the text
    DiT's (patch embedding, timestep MLP and t_block, caption and pooled MLPs), per double block
    each stream's qkv and output projection (4 D^2 per token) and MLP (2 D H per token) plus joint
    attention (2 S^2 D), per single block its input (D (3 D + H)) and output ((D + H) D) projections
    per token plus attention (2 S^2 D), and the output linear (T D p^2 C; a router: D K)."""
    d, p, L, e = size.hidden_size, size.patch_size, text.length, text.dim
    patches, hid = (input_size // p) ** 2, int(d * mlp_ratio)
    tokens = patches + (1 if num_partitions else 0)
    s = tokens + L
    macs = patches * p * p * in_channels * d + 256 * d + d * d + 6 * d * d
    macs += L * (e * d + d * d) + ((e * d + d * d) if text.pooled else 0)
    macs += size.double * (s * (4 * d * d + 2 * d * hid) + 2 * s * s * d)
    macs += size.single * (s * (d * (3 * d + hid) + (d + hid) * d) + 2 * s * s * d)
    macs += d * num_partitions if num_partitions else patches * d * p * p * in_channels
    return 2.0 * macs
