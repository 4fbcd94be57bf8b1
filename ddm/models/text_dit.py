"""A text-conditioned DiT (PixArt-alpha's design, the paper's LAION experts and Paris's): every block
cross-attends to the caption's tokens, and time enters through AdaLN-Single.

- **AdaLN-Single**: one shared MLP maps the conditioning vector c to 6 D modulation values
  (``t_block``); each block adds its own learned offsets (``scale_shift_table``, 6 x D) instead of
  owning a 6 D x D projection. On XL/2 that is 28 x 8M parameters fewer than DiT's adaLN-Zero.
- **Caption path**: the frozen encoder's tokens (N, L, E) go through a 2-layer MLP to width D
  (``y_embedder``) and are the keys and values of each block's cross-attention (padding masked).
- **Pooled path**: the encoder's pooled vector, through its own 2-layer MLP, is added to the
  timestep embedding: c = t_emb + pooled_emb.
- **Caption dropout** (classifier-free guidance): in training a caption is replaced, with
  probability ``caption_dropout_prob``, by the learned null caption (``null_tokens`` L x E, all
  attended, and ``null_pooled``); sampling's unconditional branch uses the same (``null_text``).

    block:  x += gate_msa * SelfAttn(norm1(x) * (1 + scale_msa) + shift_msa)
            x += CrossAttn(x, captions)
            x += gate_mlp * MLP(norm2(x) * (1 + scale_mlp) + shift_mlp)
            (shift, scale, gate)_{msa, mlp} = scale_shift_table + t_block(c)

The output layer is zero-initialised (the initial velocity is 0) and so is each cross-attention's
output projection (each block starts as the unconditional DiT block). Parameter and FLOP counts:
``ddm.models.config.text_dit_params`` and ``text_dit_forward_flops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddm.models.config import DiTSize, MoEConfig
from ddm.models.dit import Attention
from ddm.models.layers import Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed
from ddm.models.moe import MoEFeedForward
from ddm.models.text_encoder import TextEmbedding


class CrossAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, T, D) attends to y (N, L, D) where ``mask`` (N, L) is True; a caption with no token
        (an all-False row: a softmax over nothing, NaN) contributes nothing (no device sync)."""
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(y).reshape(n, y.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        empty = ~mask.any(dim=1)[:, None, None, None]  # (N, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask[:, None, None, :] | empty))
        out = out.masked_fill(empty, 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TextDiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, moe: MoEConfig | None = None):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MoEFeedForward(hidden_size, mlp_hidden, moe) if moe is not None else Mlp(hidden_size, mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mod`` (N or 1, 6, D): the shared t_block output."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.scale_shift_table[None] + mod).chunk(
            6, dim=1
        )  # each (N, 1, D)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class TextDiT(nn.Module):
    """Velocity model v(x_t, t, caption): (N, C, H, W) -> (N, C, H, W)."""

    def __init__(
        self,
        size: DiTSize,
        input_size: int,
        in_channels: int,
        text_dim: int,
        text_len: int,
        caption_dropout_prob: float = 0.1,
        mlp_ratio: float = 4.0,
        moe: MoEConfig = MoEConfig(),
        pooled: bool = True,
        out_features: int | None = None,
    ):
        """``out_features``: the output layer's width (default: a patch's values, p^2 C)."""
        super().__init__()
        d = size.hidden_size
        self.in_channels, self.out_channels, self.patch_size = in_channels, in_channels, size.patch_size
        self.text_dim, self.text_len, self.caption_dropout_prob = text_dim, text_len, caption_dropout_prob
        self.x_embedder = PatchEmbed(input_size, size.patch_size, in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = Mlp(text_dim, d, out_features=d)
        self.pooled_embedder = Mlp(text_dim, d, out_features=d) if pooled else None
        self.null_tokens = nn.Parameter(torch.randn(text_len, text_dim) / text_dim**0.5)
        self.null_pooled = nn.Parameter(torch.randn(text_dim) / text_dim**0.5) if pooled else None
        pos = torch.from_numpy(get_2d_sincos_pos_embed(d, self.x_embedder.grid_size)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = self.make_blocks(size, mlp_ratio, moe)
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.final_linear = nn.Linear(d, out_features or size.patch_size**2 * in_channels)
        self._init_weights()

    def make_blocks(self, size: DiTSize, mlp_ratio: float, moe: MoEConfig) -> nn.ModuleList:
        d = size.hidden_size
        return nn.ModuleList(
            TextDiTBlock(
                d, size.num_heads, mlp_ratio, moe if moe.enabled and (size.depth - 1 - i) % moe.every == 0 else None
            )
            for i in range(size.depth)
        )

    def zero_init_blocks(self) -> None:
        for block in self.blocks:  # each block starts as the unconditional one
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(layer.weight, std=0.02)
        for mlp in (self.y_embedder, self.pooled_embedder):
            if mlp is not None:
                nn.init.normal_(mlp.fc1.weight, std=0.02)
                nn.init.normal_(mlp.fc2.weight, std=0.02)
        self.zero_init_blocks()
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)

    def null_text(self, n: int) -> TextEmbedding:
        """The null caption (classifier-free guidance's unconditional branch) for n samples."""
        tokens = self.null_tokens[None].expand(n, -1, -1)
        mask = torch.ones(n, self.text_len, dtype=torch.bool, device=tokens.device)
        pooled = self.null_pooled[None].expand(n, -1) if self.null_pooled is not None else tokens[:, 0] * 0
        return TextEmbedding(tokens, mask, pooled)

    def drop_captions(self, text: TextEmbedding, drop: torch.Tensor) -> TextEmbedding:
        """``text`` with the captions where ``drop`` (N,) bool is True replaced by the null caption."""
        null = self.null_text(drop.shape[0])
        w = drop[:, None]
        return TextEmbedding(
            torch.where(w[..., None], null.tokens.to(text.tokens.dtype), text.tokens),
            torch.where(w, null.mask, text.mask),
            torch.where(w, null.pooled.to(text.pooled.dtype), text.pooled),
        )

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``text``: the captions' embeddings (tokens (N, L, E) with L = text_len, mask, pooled).
        Captions are dropped where ``drop`` says, else where ``text.drop`` does, else (in training)
        at ``caption_dropout_prob``."""
        tokens, c = self.trunk(x, t, text, drop)
        return self.unpatchify(self.head(tokens, c))

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The output layer: norm, modulated by c (its own learned offsets), then linear."""
        shift, scale = (self.final_table[None] + c[:, None]).chunk(2, dim=1)
        return self.final_linear(self.norm_final(tokens) * (1 + scale) + shift)

    def trunk(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextEmbedding,
        drop: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens after the blocks, the conditioning vector c); ``prefix`` (1, P, D) tokens go
        before the patches (a router's CLS token)."""
        tokens, c, mod, y, mask = self.inputs(x, t, text, drop, prefix)
        for block in self.blocks:
            tokens = block(tokens, mod, y, mask)
        return tokens, c

    def inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextEmbedding,
        drop: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """What the blocks take: the image tokens (``prefix`` first), the conditioning vector c, the
        shared AdaLN-Single modulations (N, 6, D), the caption tokens at width D and their mask."""
        if text.tokens.shape[1:] != (self.text_len, self.text_dim):
            raise ValueError(
                f"caption embeddings of shape {tuple(text.tokens.shape[1:])}, but this model takes "
                f"({self.text_len}, {self.text_dim}): the text encoder or its max_length differs from the model's"
            )
        if drop is None:
            drop = text.drop
        if drop is None and self.training and self.caption_dropout_prob > 0:
            drop = torch.rand(x.shape[0], device=x.device) < self.caption_dropout_prob
        if drop is not None:
            text = self.drop_captions(text, drop)
        c = self.t_embedder(t)  # (N or 1, D)
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(text.pooled)
        mod = self.t_block(c).unflatten(-1, (6, -1))  # (N, 6, D)
        y = self.y_embedder(text.tokens)  # (N, L, D)
        tokens = self.x_embedder(x) + self.pos_embed
        if prefix is not None:
            tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens, c, mod, y, text.mask

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    @property
    def moe_aux_loss(self) -> torch.Tensor:
        losses = [b.mlp.aux_loss for b in self.blocks if isinstance(b.mlp, MoEFeedForward)]
        return torch.stack(losses).sum() if losses else torch.zeros(())


class TextDiTRouter(TextDiT):
    """Router p(k | x_t, t, caption): the text DiT's trunk with a learned CLS token and a K-way
    head on it (zero-initialised: the router starts at the uniform posterior 1/K)."""

    def __init__(
        self,
        size: DiTSize,
        num_partitions: int,
        input_size: int,
        in_channels: int,
        text_dim: int,
        text_len: int,
        caption_dropout_prob: float = 0.1,
        mlp_ratio: float = 4.0,
        pooled: bool = True,
    ):
        super().__init__(
            size, input_size, in_channels, text_dim, text_len, caption_dropout_prob, mlp_ratio, MoEConfig(), pooled,
            out_features=checked_partitions(num_partitions),
        )  # fmt: skip
        add_cls_token(self, num_partitions, size.hidden_size)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens, c = self.trunk(x, t, text, drop, prefix=self.cls_token)
        return self.head(tokens[:, :1], c)[:, 0]  # (N, K) logits of the CLS token


def checked_partitions(num_partitions: int) -> int:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    return num_partitions


def add_cls_token(router: nn.Module, num_partitions: int, hidden_size: int) -> None:
    """A caption router's K and its learned CLS token, read by ``TextDiTRouter.forward``."""
    router.num_partitions = num_partitions
    router.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
    nn.init.normal_(router.cls_token, std=0.02)
