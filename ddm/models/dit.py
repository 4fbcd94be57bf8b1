"""Diffusion Transformer (Peebles & Xie, 2023) with adaLN-Zero, as a velocity model.

One architecture serves the experts (``DiT``: tokens -> velocity) and the router
(``DiTRouter``: tokens + a learned CLS token -> K logits). Sizes are presets in ``DIT_SIZES``,
from a tiny debug size to XL/2 as in the DiT paper. Flow matching predicts a velocity with the
same shape as the input, so there is no learned-sigma channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddm.models.config import DiTSize, MoEConfig
from ddm.models.layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)
from ddm.models.moe import MoEFeedForward

# Parameter names of ddm 0.1's output layers (before FinalLayer), renamed on load so exports and
# checkpoints written by it keep loading.
LEGACY_NAMES = {
    "linear_final.": "final_layer.linear.",
    "adaLN_final.": "final_layer.adaLN_modulation.",
    "head.": "final_layer.linear.",
}


def upgrade_state_dict(state: dict, prefix: str = "") -> dict:
    """``state`` with ddm 0.1's DiT/router parameter names (under ``prefix``) renamed to today's."""
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_NAMES.items():
            if key.startswith(prefix + old):
                key = prefix + new + key[len(prefix + old) :]
                break
        out[key] = value
    return out


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, D/H)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, moe: MoEConfig | None = None):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MoEFeedForward(hidden_size, mlp_hidden, moe) if moe is not None else Mlp(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class _DiTTrunk(nn.Module):
    """What the expert and the router share: embedders, positional embedding, adaLN blocks."""

    upgrade_state_dict = staticmethod(upgrade_state_dict)  # older parameter names -> today's

    def __init__(
        self,
        size: DiTSize,
        input_size: int,
        in_channels: int,
        num_classes: int,
        class_dropout_prob: float,
        mlp_ratio: float,
        moe: MoEConfig,
        time_freq_shift: int = 0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = size.patch_size
        self.num_classes = num_classes
        hidden = size.hidden_size
        self.x_embedder = PatchEmbed(input_size, size.patch_size, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden, freq_shift=time_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout_prob) if num_classes > 0 else None
        # Fixed (not learned) sin-cos positions, as in DiT.
        pos = torch.from_numpy(get_2d_sincos_pos_embed(hidden, self.x_embedder.grid_size)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        # Counting from the last block, every `moe.every`-th block gets an MoE feed-forward.
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden,
                size.num_heads,
                mlp_ratio,
                moe if moe.enabled and (size.depth - 1 - i) % moe.every == 0 else None,
            )
            for i in range(size.depth)
        )
        self._register_load_state_dict_pre_hook(_upgrade_hook)

    @property
    def null_label(self) -> int:
        """The label that means "no class" (classifier-free guidance's unconditional branch)."""
        if self.y_embedder is None:
            raise ValueError("this model is unconditional (num_classes=0): it has no null label")
        return self.y_embedder.null_label

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels y")
            c = c + self.y_embedder(y, self.training)
        return c

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x

    @property
    def moe_aux_loss(self) -> torch.Tensor:
        """Sum of the MoE load-balancing losses of the latest forward (0 without MoE)."""
        losses = [b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoEFeedForward)]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def init_weights(self) -> None:
        def _basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight.data  # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts gated off, so each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)


def _upgrade_hook(state_dict, prefix, *args) -> None:
    renamed = upgrade_state_dict({k: state_dict[k] for k in list(state_dict) if k.startswith(prefix)}, prefix)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    state_dict.update(renamed)


class DiT(_DiTTrunk):
    """Velocity model v(x_t, t, y): (N, C, H, W) -> (N, C, H, W)."""

    def __init__(
        self,
        size: DiTSize,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        mlp_ratio: float = 4.0,
        moe: MoEConfig = MoEConfig(),
        time_freq_shift: int = 0,
        learn_sigma: bool = False,
    ):
        super().__init__(
            size, input_size, in_channels, num_classes, class_dropout_prob, mlp_ratio, moe, time_freq_shift
        )
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.final_layer = FinalLayer(size.hidden_size, size.patch_size**2 * self.out_channels)
        self.init_weights()
        self.final_layer.init_zero()  # the initial velocity is 0 everywhere

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C') -> (N, C', H, W), C' the output channels (C, or 2C with learn_sigma)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, with_sigma: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The prediction (N, C, H, W); with ``with_sigma`` (learn_sigma models) also the variance
        interpolation v (N, C, H, W) of its second C output channels."""
        c = self.condition(t, y)  # (N, D)
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        tokens = self.run_blocks(tokens, c)  # (N, T, D)
        out = self.unpatchify(self.final_layer(tokens, c))  # (N, T, p*p*C') -> (N, C', H, W)
        if not self.learn_sigma:
            if with_sigma:
                raise ValueError("this DiT has no learned sigma (model.learn_sigma=false)")
            return out
        pred, v = out.split(self.in_channels, dim=1)
        return (pred, v) if with_sigma else pred


class DiTRouter(_DiTTrunk):
    """Router p(k | x_t, t, y): the DiT trunk with a learned CLS token and a K-way head."""

    def __init__(
        self,
        size: DiTSize,
        num_partitions: int,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        mlp_ratio: float = 4.0,
        time_freq_shift: int = 0,
    ):
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        super().__init__(
            size, input_size, in_channels, num_classes, class_dropout_prob, mlp_ratio, MoEConfig(), time_freq_shift
        )
        self.num_partitions = num_partitions
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.hidden_size))
        self.final_layer = FinalLayer(size.hidden_size, num_partitions)
        self.init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        self.final_layer.init_zero()  # the router starts at the uniform posterior 1/K

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        c = self.condition(t, y)  # (N, D)
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (N, 1, D)
        tokens = self.run_blocks(torch.cat([cls, tokens], dim=1), c)  # (N, 1+T, D)
        return self.final_layer(tokens[:, :1], c)[:, 0]  # (N, K) logits of the CLS token
