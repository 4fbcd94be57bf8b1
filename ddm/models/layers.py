"""Building blocks shared by the DiT experts, the router and the MLP models."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ddm.models.config import TIME_SCALE


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (N, T, D) by per-sample shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) times in [0, 1] -> (N, dim): [cos, sin] of the scaled time at
    frequencies max_period^(-i / (dim/2 - freq_shift)) (0: DiT; 1: diffusers' DiT)."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * steps / (half - freq_shift))
    args = (t.float() * TIME_SCALE)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def is_shared(t: torch.Tensor) -> bool:
    """One time for the whole batch: an expanded (N,) tensor, stride 0; known by its layout, so
    neither a host sync nor a graph break."""
    return t.dim() == 1 and t.numel() > 1 and t.stride(0) == 0


class TimestepEmbedder(nn.Module):
    """Embeds scalar times into vectors: sinusoidal features followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) -> (N, D); or (1, D) when all N times are one shared time, which broadcasts in
        every use.

        Samplers call with one shared t for the whole batch, made with ``expand`` (stride 0);
        keeping a single row lets each block's adaLN/FiLM projection run once instead of N times.
        The test reads the tensor's layout, never its values: no host sync in a step, no graph
        break under torch.compile.
        """
        if is_shared(t):
            return self._embed(t[:1])
        return self._embed(t)

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    Index ``num_classes`` is the null (unconditional) label. During training each label is
    replaced by the null label with probability ``dropout_prob``, so one network learns both
    v(x, t, c) and v(x, t, null).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a LabelEmbedder, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(torch.bool)
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # The range check reads the labels: on the host only (free there). On a GPU it would make
        # every step wait for the device; training batches are checked on the host by the
        # prefetcher (ddm.train.prefetch), sampling's labels by the commands that take them.
        on_host = labels.device.type == "cpu" and not torch.compiler.is_compiling()
        if on_host and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null), "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> patch tokens (N, T, D) with a strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class Mlp(nn.Module):
    """The transformer feed-forward block (GELU, tanh approximation as in DiT)."""

    def __init__(self, hidden_size: int, mlp_hidden: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, out_features or hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map: the DiT's output layer, and the router's head
    (applied to its CLS token). Zero-initialised: the output starts at 0 (a zero velocity, or
    the router's uniform posterior)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # Registration order (linear, then adaLN) fixes the parameter order that ZeRO's flat
        # optimizer buffers follow; checkpoints of DiT experts depend on it.
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def init_zero(self) -> None:
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, out_features)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positional embedding, (grid_size**2, embed_dim) (MAE / DiT)."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid_w = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    if embed_dim % 2:
        raise ValueError(f"positional embedding dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
