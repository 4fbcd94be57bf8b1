"""An MMDiT (SD3's and FLUX's design, the paper's 3B scale-up experts): text and image tokens attend
to each other jointly, each stream with weights of its own, then (FLUX) one stream over both.

- **Double-stream blocks** (``MMDiTBlock``): the caption tokens c and the image tokens x each have
  their own norms, qkv and output projections, feed-forward and modulation offsets; attention runs
  over the concatenation [c; x] (padding of the caption masked out as keys), so every image token
  reads the caption and every caption token the image.
- **Single-stream blocks** (``SingleStreamBlock``, FLUX's): one set of weights over [c; x], attention
  and feed-forward in parallel (one input projection to qkv and the MLP's hidden, one output
  projection from both).
- **Modulation**: AdaLN-Single, as in ``ddm.models.text_dit`` (one shared MLP maps the conditioning
  vector c = t_emb + pooled_emb to 6 D values; each stream of each block adds its own learned
  offsets: 6 x D per stream of a double block, 3 x D for a single block) instead of FLUX's per-block
  6 D x D projections: at MMDiT-3B/2 that is what keeps 30 blocks of width 2560 near 3B parameters.
- Caption path, pooled path, caption dropout to the learned null caption, the output layer and the
  router's CLS token are the text DiT's (``TextDiT``, which this extends).

Parameter and FLOP counts: ``ddm.models.config.mmdit_params`` and ``mmdit_forward_flops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddm.models.config import MMDiTSize, MoEConfig
from ddm.models.layers import Mlp
from ddm.models.text_dit import TextDiT, TextDiTRouter, add_cls_token, checked_partitions
from ddm.models.text_encoder import TextEmbedding


def joint_attention(qkv: torch.Tensor, num_heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over all tokens of ``qkv`` (N, S, 3 D); keys where ``key_mask``
    (N, S) is False are left out. Returns (N, S, D)."""
    n, s, three_d = qkv.shape
    d = three_d // 3
    q, k, v = qkv.reshape(n, s, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2).reshape(n, s, d)


class MMDiTBlock(nn.Module):
    """Double-stream block: per-stream weights, joint attention over [caption; image]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        d, hid = hidden_size, int(hidden_size * mlp_ratio)
        if d % num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        norm = lambda: nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # noqa: E731
        self.norm1_x, self.norm2_x, self.norm1_c, self.norm2_c = norm(), norm(), norm(), norm()
        self.qkv_x, self.qkv_c = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d)
        self.proj_x, self.proj_c = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp_x, self.mlp_c = Mlp(d, hid), Mlp(d, hid)
        self.table_x = nn.Parameter(torch.randn(6, d) / d**0.5)
        self.table_c = nn.Parameter(torch.randn(6, d) / d**0.5)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mod: torch.Tensor, key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, T, D) image tokens, c (N, L, D) caption tokens, ``mod`` (N, 6, D) the shared
        modulations, ``key_mask`` (N, L + T)."""
        mx = (self.table_x[None] + mod).chunk(6, dim=1)  # shift, scale, gate (attention), then (MLP)
        mc = (self.table_c[None] + mod).chunk(6, dim=1)
        hx = self.norm1_x(x) * (1 + mx[1]) + mx[0]
        hc = self.norm1_c(c) * (1 + mc[1]) + mc[0]
        out = joint_attention(torch.cat([self.qkv_c(hc), self.qkv_x(hx)], dim=1), self.num_heads, key_mask)
        length = c.shape[1]
        x = x + mx[2] * self.proj_x(out[:, length:])
        c = c + mc[2] * self.proj_c(out[:, :length])
        x = x + mx[5] * self.mlp_x(self.norm2_x(x) * (1 + mx[4]) + mx[3])
        c = c + mc[5] * self.mlp_c(self.norm2_c(c) * (1 + mc[4]) + mc[3])
        return x, c


class SingleStreamBlock(nn.Module):
    """FLUX's single-stream block over z = [caption; image]: z += gate * W2 [attn(qkv); gelu(m)],
    (qkv, m) = W1 (norm(z) (1 + scale) + shift)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        d, hid = hidden_size, int(hidden_size * mlp_ratio)
        self.num_heads, self.hidden = num_heads, hid
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(d, 3 * d + hid)
        self.act = nn.GELU(approximate="tanh")
        self.linear2 = nn.Linear(d + hid, d)
        self.table = nn.Parameter(torch.randn(3, d) / d**0.5)

    def forward(self, z: torch.Tensor, mod: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = (self.table[None] + mod[:, :3]).chunk(3, dim=1)
        qkv, hidden = self.linear1(self.norm(z) * (1 + scale) + shift).split([self.linear1.out_features - self.hidden,
                                                                              self.hidden], dim=-1)  # fmt: skip
        out = joint_attention(qkv, self.num_heads, key_mask)
        return z + gate * self.linear2(torch.cat([out, self.act(hidden)], dim=-1))


class MMDiT(TextDiT):
    """Velocity model v(x_t, t, caption): ``size.double`` double-stream blocks, then
    ``size.single`` single-stream blocks; the output layer reads the image tokens."""

    def __init__(self, size: MMDiTSize, input_size: int, in_channels: int, text_dim: int, text_len: int,
                 caption_dropout_prob: float = 0.1, mlp_ratio: float = 4.0, pooled: bool = True,
                 out_features: int | None = None):  # fmt: skip
        super().__init__(size, input_size, in_channels, text_dim, text_len, caption_dropout_prob, mlp_ratio,
                         MoEConfig(), pooled, out_features)  # fmt: skip

    def make_blocks(self, size: MMDiTSize, mlp_ratio: float, moe: MoEConfig) -> nn.ModuleList:
        d, h = size.hidden_size, size.num_heads
        self.single_blocks = nn.ModuleList(SingleStreamBlock(d, h, mlp_ratio) for _ in range(size.single))
        return nn.ModuleList(MMDiTBlock(d, h, mlp_ratio) for _ in range(size.double))

    def zero_init_blocks(self) -> None:
        pass  # the output layer starts at zero (velocity 0); the blocks keep their random start

    def trunk(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbedding, drop: torch.Tensor | None = None,
              prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        tokens, c, mod, y, mask = self.inputs(x, t, text, drop, prefix)
        key_mask = torch.cat([mask, torch.ones(mask.shape[0], tokens.shape[1], dtype=torch.bool, device=mask.device)],
                             dim=1)  # fmt: skip
        for block in self.blocks:
            tokens, y = block(tokens, y, mod, key_mask)
        if len(self.single_blocks):
            z = torch.cat([y, tokens], dim=1)
            for block in self.single_blocks:
                z = block(z, mod, key_mask)
            tokens = z[:, y.shape[1] :]
        return tokens, c

    @property
    def moe_aux_loss(self) -> torch.Tensor:
        return torch.zeros(())


class MMDiTRouter(MMDiT):
    """Router p(k | x_t, t, caption) on the MMDiT trunk: a learned CLS token among the image tokens
    and a K-way head on it (zero-initialised: the uniform posterior 1/K)."""

    def __init__(self, size: MMDiTSize, num_partitions: int, input_size: int, in_channels: int, text_dim: int,
                 text_len: int, caption_dropout_prob: float = 0.1, mlp_ratio: float = 4.0,
                 pooled: bool = True):  # fmt: skip
        super().__init__(size, input_size, in_channels, text_dim, text_len, caption_dropout_prob, mlp_ratio, pooled,
                         out_features=checked_partitions(num_partitions))  # fmt: skip
        add_cls_token(self, num_partitions, size.hidden_size)

    forward = TextDiTRouter.forward
