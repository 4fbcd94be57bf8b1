"""Rebuild a ddm expert with plain PyTorch: no ddm import, only an export's config.json and
model.safetensors (safetensors + torch + numpy).

    python examples/plain_dit.py <store>/experts/00/export      # samples 16 images -> plain_samples.pt

Everything the network needs comes from ``config.json["architecture"]`` (sizes, embeddings, null
label) and ``config.json["probability_path"]`` (the path and the velocity target); parameter names
match the safetensors file, so ``load_state_dict(strict=True)`` checks the rebuild. Dense DiT experts
only (an MoE export's expert weights would need DeepSpeed's MoE layer).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64)), axis=0)
    g = g.reshape(2, 1, grid, grid)
    return torch.from_numpy(np.concatenate([sincos_1d(dim // 2, g[0]), sincos_1d(dim // 2, g[1])], axis=1)).float()


class TimeEmbed(nn.Module):
    def __init__(self, hidden: int, spec: dict):
        super().__init__()
        self.spec = spec
        self.mlp = nn.Sequential(nn.Linear(spec["frequencies"], hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.spec["frequencies"] // 2
        steps = torch.arange(half, dtype=torch.float32) / (half - self.spec.get("freq_shift", 0))
        freqs = torch.exp(-math.log(self.spec["max_period"]) * steps)
        args = (t.float() * self.spec["time_scale"])[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class Final(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PlainDiT(nn.Module):
    """v(x_t, t, y) from ``config.json["architecture"]`` (family "dit")."""

    def __init__(self, a: dict):
        super().__init__()
        if a["family"] != "dit" or a.get("moe"):
            raise ValueError(f"this example rebuilds dense DiT experts, not {a['family']} (moe: {a.get('moe')})")
        h, p, c = a["hidden_size"], a["patch_size"], a["in_channels"]
        self.a = a
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(c, h, kernel_size=p, stride=p)
        self.t_embedder = TimeEmbed(h, a["time_embedding"])
        if a["num_classes"]:
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(a["num_classes"] + 1, h)  # the last row: null label
        self.register_buffer("pos_embed", sincos_2d(h, a["input_size"] // p)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(h, a["num_heads"], a["mlp_ratio"]) for _ in range(a["depth"]))
        self.final_layer = Final(h, p * p * (a.get("out_channels") or c))  # 2C: a learned sigma

    def forward(self, x, t, y=None):
        a = self.a
        cond = self.t_embedder(t)
        if a["num_classes"]:
            cond = cond + self.y_embedder.embedding_table(y)
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens, cond)
        out = self.final_layer(tokens, cond)  # (N, T, p*p*C') -> (N, C', H, W)
        p, c, g = a["patch_size"], a.get("out_channels") or a["in_channels"], a["input_size"] // a["patch_size"]
        out = torch.einsum("nhwpqc->nchpwq", out.reshape(len(x), g, g, p, p, c))
        return out.reshape(len(x), c, g * p, g * p)[:, : a["in_channels"]]  # the prediction (a sigma dropped)


def load(export_dir: str) -> tuple[PlainDiT, dict]:
    with open(os.path.join(export_dir, "config.json")) as f:
        config = json.load(f)
    model = PlainDiT(config["architecture"])
    model.load_state_dict(load_file(os.path.join(export_dir, "model.safetensors")), strict=True)
    return model.eval(), config


@torch.no_grad()
def sample(model: PlainDiT, config: dict, n: int = 16, steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Euler steps of dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data), labels 0, 1, 2, ..."""
    a = config["architecture"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a["in_channels"], a["input_size"], a["input_size"], generator=g)
    y = torch.arange(n) % a["num_classes"] if a["num_classes"] else None
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * model(x, t0.expand(n), y)
    return x


if __name__ == "__main__":
    net, cfg = load(sys.argv[1])
    torch.save(sample(net, cfg), "plain_samples.pt")
    print(f"{cfg['architecture']['preset']} rebuilt from config.json; 16 samples -> plain_samples.pt")
