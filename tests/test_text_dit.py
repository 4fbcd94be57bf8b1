"""The text-conditioned DiT (cross-attention, AdaLN-Single, pooled text, caption dropout): shapes,
what starts at zero, that the caption is used, dropout to the null caption, and parameter and
FLOP counts from its layout against torch's own (numel, FlopCounterMode)."""

import pytest
import torch

from ddm.models.config import DIT_SIZES, DiTSize, TextConfig, text_dit_forward_flops, text_dit_params
from ddm.models.text_dit import TextDiT
from ddm.models.text_encoder import TextEmbedding

TINY = DIT_SIZES["DiT-Tiny/2"]


def captions(n: int, length: int = 6, dim: int = 16, seed: int = 0) -> TextEmbedding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < torch.randint(2, length + 1, (n,), generator=g)[:, None]
    return TextEmbedding(torch.randn(n, length, dim, generator=g), mask, torch.randn(n, dim, generator=g))


def model(**kw) -> TextDiT:
    torch.manual_seed(0)
    return TextDiT(TINY, input_size=8, in_channels=1, text_dim=16, text_len=6, **kw)


def trained_a_little(m: TextDiT) -> TextDiT:
    """Zero-initialised outputs hide everything: give every parameter a nudge."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_starts_at_zero_and_uses_the_caption():
    m = model().eval()
    x, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), captions(3)
    assert torch.equal(m(x, t, text), torch.zeros(3, 1, 8, 8))  # zero output layer: velocity 0
    m = trained_a_little(m)
    out = m(x, t, text)
    assert out.shape == (3, 1, 8, 8)
    other = captions(3, seed=1)
    assert not torch.allclose(m(x, t, other), out)  # the caption matters
    # Padding is masked: what lies beyond a caption's mask changes nothing.
    padded = TextEmbedding(torch.where(text.mask[..., None], text.tokens, torch.randn_like(text.tokens)), text.mask,
                           text.pooled)  # fmt: skip
    torch.testing.assert_close(m(x, t, padded), out)
    # Each sample is computed on its own: a batch of one gives its row of the batch.
    one = TextEmbedding(text.tokens[1:2], text.mask[1:2], text.pooled[1:2])
    torch.testing.assert_close(m(x[1:2], t[1:2], one), out[1:2], rtol=1e-5, atol=1e-6)


def test_caption_dropout_is_the_null_caption():
    m = trained_a_little(model(caption_dropout_prob=0.5))
    x, t, text = torch.randn(4, 1, 8, 8), torch.rand(4), captions(4)
    drop = torch.tensor([True, False, True, False])
    dropped = m(x, t, text, drop=drop)
    null = m(x, t, m.null_text(4))
    torch.testing.assert_close(dropped[drop], null[drop])
    torch.testing.assert_close(dropped[~drop], m(x, t, text)[~drop])
    # In training about caption_dropout_prob of the captions are dropped, and the null caption learns.
    m.train()
    torch.manual_seed(1)
    many = TextEmbedding(*(v.repeat(64, *[1] * (v.dim() - 1)) for v in (text.tokens, text.mask, text.pooled)))
    loss = m(x.repeat(64, 1, 1, 1), t.repeat(64), many).square().mean()
    loss.backward()
    assert m.null_tokens.grad is not None and m.null_tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"caption embeddings of shape \(7, 16\).*takes \(6, 16\)"):
        m(x, t, captions(4, length=7))


def test_a_caption_with_no_token_attends_to_nothing():
    """An all-False mask row (a softmax over no key is NaN) gives a finite velocity that does not
    depend on that row's token values; the other rows are unchanged."""
    m = trained_a_little(model())
    x, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), captions(3)
    out = m(x, t, text)
    mask = text.mask.clone()
    mask[1] = False
    empty = m(x, t, TextEmbedding(text.tokens, mask, text.pooled))
    other = m(x, t, TextEmbedding(text.tokens * 3, mask, text.pooled))
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[1], m(x, t, TextEmbedding(torch.zeros_like(text.tokens), mask, text.pooled))[1])
    torch.testing.assert_close(other[1], empty[1])
    torch.testing.assert_close(empty[[0, 2]], out[[0, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooled", [True, False])
def test_parameter_and_flop_counts_match_torch(pooled):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = DiTSize(depth=2, hidden_size=32, num_heads=2, patch_size=2)
    m = TextDiT(size, input_size=8, in_channels=3, text_dim=24, text_len=5, pooled=pooled).eval()
    text_cfg = TextConfig(encoder="tiny", dim=24, length=5, pooled=pooled)
    assert sum(p.numel() for p in m.parameters()) == text_dit_params(size, 8, 3, text_cfg)
    text = TextEmbedding(torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 24))
    # The math attention kernel is made of matmuls the counter sees (the fused CPU kernel is not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), text)
    assert counter.get_total_flops() == 2 * text_dit_forward_flops(size, 8, 3, text_cfg)


def test_a_paris_sized_xl2_has_about_605m_parameters():
    """Paris's experts: DiT-XL/2 with AdaLN-Single and CLIP ViT-L/14 text (768 wide, 77 tokens) on
    32x32x4 latents: about 605M parameters (DiT-XL/2 with adaLN-Zero has 675M)."""
    n = text_dit_params(DIT_SIZES["DiT-XL/2"], 32, 4, TextConfig(encoder="clip-l", dim=768, length=77))
    assert 600e6 < n < 610e6, n


def test_guidance_with_the_null_caption_per_sample():
    """v = v(null) + s (v(c) - v(null)), the null being the model's null caption, with one scale per sample."""
    from ddm.models.flow import guided

    m = trained_a_little(model())
    x, t, text = torch.randn(3, 1, 8, 8), torch.rand(3), captions(3)
    scale = torch.tensor([1.0, 2.0, 4.5])
    v = guided(m, text, scale)(x, t)
    cond, null = m(x, t, text), m(x, t, m.null_text(3))
    torch.testing.assert_close(v, null + scale.reshape(-1, 1, 1, 1) * (cond - null))
    torch.testing.assert_close(guided(m, text, 1.0)(x, t), cond)


def test_an_ensemble_of_text_experts_routes_rows_with_their_captions():
    """Top-1 and full over two text experts: each row gets its own caption and guidance, exactly
    as the experts give them one by one."""
    from ddm.ensemble.combine import Ensemble
    from ddm.ensemble.rules import Rule

    experts = [trained_a_little(model()), trained_a_little(model())]
    torch.manual_seed(5)
    logits = torch.randn(4, 2)

    class FixedRouter(torch.nn.Module):
        num_partitions = 2

        def forward(self, x, t, y=None):
            return logits[: x.shape[0]]

    x, t, text = torch.randn(4, 1, 8, 8), torch.rand(4), captions(4)
    scale = torch.tensor([1.0, 3.0, 3.0, 1.5])
    one = [torch.cat([guided_row(e, x, t, text, scale, i) for i in range(4)]) for e in experts]
    top = logits.argmax(1)
    ens = Ensemble(experts, FixedRouter(), Rule.parse("top1"))
    expected = torch.stack([one[int(top[i])][i] for i in range(4)])
    torch.testing.assert_close(ens.velocity(x, t, text, guidance_scale=scale), expected, rtol=1e-5, atol=1e-6)
    p = logits.softmax(1)
    ens = Ensemble(experts, FixedRouter(), Rule.parse("full"))
    expected = p[:, :1, None, None] * one[0] + p[:, 1:, None, None] * one[1]
    torch.testing.assert_close(ens.velocity(x, t, text, guidance_scale=scale), expected, rtol=1e-5, atol=1e-6)


def test_distillation_drops_a_caption_once_for_student_and_teacher_each_with_its_own_null():
    """The distillation loss marks dropped captions (``TextEmbedding.drop``); the oracle teacher
    runs each row's expert, which puts its own null caption in a dropped row: the loss is the
    closed form |v_s(x_t, t, c_s) - v_{k(i)}(x_t, t, c_{k(i)})|^2, c = the null of each model where
    dropped. A mark survives indexing and joining, and a model in training does not drop again."""
    from ddm.ensemble.combine import Ensemble
    from ddm.ensemble.rules import Rule
    from ddm.models.config import FlowConfig
    from ddm.models.flow import FlowMatching
    from ddm.train.objectives import DistillLoss

    def nudged(seed: int, **kw) -> TextDiT:
        m = model(**kw)
        torch.manual_seed(seed)  # three different models
        return trained_a_little(m)

    experts = [nudged(1), nudged(2)]
    student = nudged(3, caption_dropout_prob=0.0).train()
    teacher = Ensemble(experts, None, Rule.parse("oracle"))
    x, text, part = torch.randn(6, 1, 8, 8), captions(6), torch.tensor([0, 1, 1, 0, 1, 0])
    flow = FlowMatching.of(FlowConfig())
    loss = DistillLoss(flow, lambda x, t, y, partition: teacher.velocity(x, t, y, partition=partition), 0, 0.5)
    x_t, t = flow.noised(x, torch.Generator().manual_seed(3))  # the loss's draws: x_t and t, then the drop
    torch.manual_seed(0)
    drop = torch.rand(6) < 0.5
    assert 0 < int(drop.sum()) < 6

    def own(m, i):  # row i's caption for model m: its null where dropped
        return m.null_text(1) if drop[i] else text[i : i + 1]

    rows = range(6)
    v_s = torch.cat([student(x_t[i : i + 1], t[i : i + 1], own(student, i)) for i in rows])
    v_t = torch.cat([experts[int(part[i])](x_t[i : i + 1], t[i : i + 1], own(experts[int(part[i])], i)) for i in rows])
    torch.manual_seed(0)
    got = loss(student, {"x": x, "y": text, "partition": part}, torch.Generator().manual_seed(3))
    assert got > 0
    torch.testing.assert_close(got, (v_s - v_t).pow(2).mean(), rtol=1e-5, atol=1e-7)
    marked = TextEmbedding(text.tokens, text.mask, text.pooled, drop)
    assert torch.equal(marked[[1, 4]].drop, drop[[1, 4]]) and marked.to("cpu").drop is not None
    joined = TextEmbedding.cat([marked, text])
    assert torch.equal(joined.drop, torch.cat([drop, torch.zeros(6, dtype=torch.bool)]))


def guided_row(m, x, t, text, scale, i):
    from ddm.models.flow import guided

    return guided(m, text[i : i + 1], float(scale[i]))(x[i : i + 1], t[i : i + 1])


def test_the_text_router_starts_uniform_reads_the_caption_and_counts_its_flops():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ddm.models.build import build_router
    from ddm.models.config import ModelConfig, forward_flops

    cfg = ModelConfig("DiT-Tiny/2", (1, 8, 8), text=TextConfig(encoder="tiny", dim=16, length=6))
    router = build_router(cfg, 3).eval()
    x, t, text = torch.randn(4, 1, 8, 8), torch.rand(4), captions(4)
    assert torch.equal(router(x, t, text), torch.zeros(4, 3))  # uniform posterior at the start
    router = trained_a_little(router)
    logits = router(x, t, text)
    assert logits.shape == (4, 3) and not torch.allclose(router(x, t, captions(4, seed=2)), logits)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        router(x, t, text)
    assert counter.get_total_flops() == 4 * forward_flops(cfg, router=True, num_partitions=3)


def test_text_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="embeddings=store needs model.text.encoder"):
        TextConfig(embeddings="store")
    with pytest.raises(ValueError, match="must be job or store"):
        TextConfig(encoder="x", dim=4, length=4, embeddings="disk")


def test_a_batch_of_captions_moves_to_the_device_as_tensors_only():
    """The prefetcher copies every tensor of a batch (a caption embedding's fields too) to the GPU;
    an unset field (``drop``) is not one of them."""
    from ddm.train.prefetch import tensors

    batch = {"x": torch.zeros(2, 1, 8, 8), "y": captions(2), "partition": torch.zeros(2), "none": None}
    got = list(tensors(batch))
    assert len(got) == 2 + 3 and all(isinstance(t, torch.Tensor) for t in got)
    batch["y"] = TextEmbedding(*(getattr(batch["y"], f) for f in ("tokens", "mask", "pooled")), torch.ones(2).bool())
    assert len(list(tensors(batch))) == 2 + 4
