"""The MMDiT (joint attention over caption and image tokens, per-stream weights, then FLUX's
single-stream blocks): counts from its layout against torch's own, every image token reading the
caption (and padding masked), caption dropout and guidance with the null caption, its router, a
preset at the paper's 3B scale-up size, and a debug size that trains as a text expert job."""

import pytest
import torch

from ddm.models.config import (
    MMDIT_SIZES,
    MMDiTSize,
    ModelConfig,
    MoEConfig,
    TextConfig,
    mmdit_forward_flops,
    mmdit_params,
)
from ddm.models.mmdit import MMDiT, MMDiTRouter
from ddm.models.text_encoder import TextEmbedding

SIZE = MMDiTSize(double=2, single=1, hidden_size=32, num_heads=2, patch_size=2)


def captions(n: int, length: int = 5, dim: int = 24, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (n,), generator=g)[:, None]
    return TextEmbedding(torch.randn(n, length, dim, generator=g), mask, torch.randn(n, dim, generator=g))


def nudged(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("router", [False, True])
def test_parameter_and_flop_counts_match_torch(pooled, router):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    text_cfg = TextConfig(encoder="tiny", dim=24, length=5, pooled=pooled)
    k = 3 if router else None
    m = (MMDiTRouter(SIZE, 3, 8, 3, 24, 5, pooled=pooled) if router else MMDiT(SIZE, 8, 3, 24, 5, pooled=pooled)).eval()
    assert sum(p.numel() for p in m.parameters()) == mmdit_params(SIZE, 8, 3, text_cfg, num_partitions=k)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), captions(2))
    assert counter.get_total_flops() == 2 * mmdit_forward_flops(SIZE, 8, 3, text_cfg, num_partitions=k)


def test_the_3b_preset_and_its_counts():
    t5 = TextConfig(encoder="google/t5-v1_1-xl", dim=2048, length=120)
    cfg = ModelConfig("MMDiT-3B/2", (4, 32, 32), text=t5)
    size = MMDIT_SIZES["MMDiT-3B/2"]
    assert (size.hidden_size, size.depth) == (2560, 30)  # the paper's scale-up experts
    from ddm.models.build import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(cfg).parameters())
    assert n == mmdit_params(size, 32, 4, t5) and 2.9e9 < n < 3.2e9
    from ddm.models.config import architecture, forward_flops

    assert forward_flops(cfg) == mmdit_forward_flops(size, 32, 4, t5)
    arch = architecture(cfg)
    assert arch["family"] == "text-mmdit" and arch["blocks"]["double"] == 8 and arch["blocks"]["single"] == 22
    assert architecture(cfg, num_partitions=8)["family"] == "text-mmdit-router"
    with pytest.raises(ValueError, match="MMDiT-3B/2 reads captions: set model.text"):
        ModelConfig("MMDiT-3B/2", (4, 32, 32))
    with pytest.raises(ValueError, match="has no MoE feed-forward yet"):
        ModelConfig("MMDiT-Tiny/2", (4, 32, 32), text=t5, moe=MoEConfig(num_experts=4))


def test_every_image_token_reads_the_caption_and_padding_is_masked():
    m = nudged(MMDiT(SIZE, 8, 1, 24, 5))
    x, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), captions(3)
    out = m(x, t, text)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    other = TextEmbedding(text.tokens.clone(), text.mask, text.pooled)
    other.tokens[:, 0] += 1.0  # the first token is always attended
    changed = (m(x, t, other) - out).abs().flatten(2).amax(dim=2)  # per sample and channel
    assert (changed > 0).all()
    padded = TextEmbedding(torch.where(text.mask[..., None], text.tokens, torch.randn_like(text.tokens)), text.mask,
                           text.pooled)  # fmt: skip
    torch.testing.assert_close(m(x, t, padded), out)
    torch.testing.assert_close(m(x[1:2], t[1:2], text[1:2]), out[1:2], rtol=1e-5, atol=1e-6)  # rows independent


def test_caption_dropout_and_guidance_use_the_null_caption():
    from ddm.models.flow import guided

    m = nudged(MMDiT(SIZE, 8, 1, 24, 5, caption_dropout_prob=0.5))
    x, t, text = torch.randn(4, 1, 8, 8), torch.rand(4), captions(4)
    drop = torch.tensor([True, False, True, False])
    dropped, null = m(x, t, text, drop=drop), m(x, t, m.null_text(4))
    torch.testing.assert_close(dropped[drop], null[drop])
    torch.testing.assert_close(dropped[~drop], m(x, t, text)[~drop])
    marked = TextEmbedding(text.tokens, text.mask, text.pooled, drop)  # distillation's mark
    torch.testing.assert_close(m(x, t, marked), dropped)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.5])
    torch.testing.assert_close(guided(m, text, scale)(x, t), null + scale.reshape(-1, 1, 1, 1) * (m(x, t, text) - null))


def test_the_router_starts_uniform_and_reads_the_caption():
    r = MMDiTRouter(SIZE, 4, 8, 1, 24, 5).eval()
    x, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), captions(3)
    assert torch.equal(r(x, t, text), torch.zeros(3, 4))
    r = nudged(r)
    logits = r(x, t, text)
    assert logits.shape == (3, 4) and not torch.allclose(r(x, t, captions(3, seed=1)), logits)


def test_a_debug_size_learns():
    """A few optimizer steps of flow matching on fixed data lower the loss (gradients reach every stream)."""
    from ddm.models.config import FlowConfig
    from ddm.models.flow import FlowMatching

    torch.manual_seed(0)
    m = MMDiT(MMDIT_SIZES["MMDiT-Tiny/4"], 16, 1, 24, 5).train()
    flow = FlowMatching.of(FlowConfig())
    x, text = torch.full((16, 1, 16, 16), 0.5), captions(16)  # one image: its velocity is learnable
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = flow.training_losses(m, x, text, generator=torch.Generator().manual_seed(step))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        if step == 5:  # (at step 0 only the zero-initialised output layer has a gradient)
            for name in ("blocks.0.qkv_c.weight", "blocks.0.mlp_x.fc1.weight", "single_blocks.0.linear1.weight"):
                assert m.get_parameter(name).grad.abs().sum() > 0, name
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
