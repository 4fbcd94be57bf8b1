"""Pretrained weights from outside ddm (``ddm.models.pretrained``): diffusers' DiT, proven against
diffusers' own model on the same inputs; facebookresearch/DiT checkpoints by their names and
shapes as the DiT repository's models.py makes them, with their learned sigma; the refusals that
keep a wrong start from training."""

from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch

from ddm.models.build import build_model
from ddm.models.config import ModelConfig
from ddm.models.pretrained import check_source, init_from
from ddm.store import Store
from tests.helpers import diffusers_dit

diffusers = pytest.importorskip("diffusers")  # the test extra installs it (ddm[encoders])

C = 4  # latent channels: with 4, "the first C of every 2C outputs" differs from "every other output"


def ddm_dit(time_freq_shift: int = 1, arch: str = "DiT-Tiny/2", channels: int = C):
    cfg = ModelConfig(arch, (channels, 8, 8), num_classes=10, time_freq_shift=time_freq_shift)
    return build_model(cfg).eval()


def inputs(channels: int = C):
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 3, 7, 9, 10])  # 10: the null class
    return torch.randn(5, channels, 8, 8, generator=g), torch.tensor([0, 1, 250, 500, 999]), labels


def diffusers_out(reference, x, steps, y):
    with torch.no_grad():
        return reference(x, timestep=steps, class_labels=y).sample[:, : x.shape[1]]


def ddm_out(model, x, steps, y):
    with torch.no_grad():
        return model(x, steps.float() / 1000, y)  # ddm's time t in [0, 1] is DiT's step / 1000


@pytest.mark.parametrize("norm_eps, tolerance", [(1e-6, 0.0), (1e-5, 2e-5)])
def test_a_diffusers_dit_computes_what_diffusers_computes(tmp_path, norm_eps, tolerance):
    """ddm's DiT loaded from a diffusers folder gives diffusers' outputs on the same inputs (its
    noise half: the learned sigma is dropped): exactly with DiT's norm eps 1e-6, to 1e-6 of the
    output's size with diffusers' default 1e-5 before each feed-forward."""
    reference = diffusers_dit(tmp_path, norm_eps, out_channels=2 * C, in_channels=C)
    model = ddm_dit()
    record = init_from(model, str(tmp_path), Store(str(tmp_path)))
    want, got = diffusers_out(reference, *inputs()), ddm_out(model, *inputs())
    assert want.abs().max() > 0.5  # not a trivially zero output
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()
    assert record["format"] == "diffusers DiTTransformer2DModel" and record["url"] == str(tmp_path)
    weights = (tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()
    assert any("learned sigma" in n for n in record["notes"])
    assert any("normalises" in n for n in record["notes"]) == (norm_eps != 1e-6)


def test_a_learned_sigma_is_kept_where_the_model_has_one(tmp_path):
    """With model.learn_sigma the variance head loads too: both halves equal diffusers' output."""
    reference = diffusers_dit(tmp_path, 1e-6, out_channels=2 * C, in_channels=C)
    cfg = ModelConfig("DiT-Tiny/2", (C, 8, 8), num_classes=10, time_freq_shift=1, learn_sigma=True)
    model = build_model(cfg).eval()
    record = init_from(model, str(tmp_path), Store(str(tmp_path)))
    x, steps, y = inputs()
    with torch.no_grad():
        want = reference(x, timestep=steps, class_labels=y).sample
        pred, v = model(x, steps.float() / 1000, y, with_sigma=True)
    assert torch.equal(torch.cat([pred, v], dim=1), want) and "learned sigma: kept" in record["notes"][-1]


def test_older_saves_pipelines_shards_and_half_precision_load_alike(tmp_path):
    """A pipeline folder (its transformer/); the generic class name older saves use (the hub's
    DiT among them); fp16 weights in shards with their index; a model without learned sigma."""
    reference = diffusers_dit(tmp_path / "pipe" / "transformer", 1e-6, out_channels=2 * C, in_channels=C)
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    config = tmp_path / "pipe" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "Transformer2DModel"}))
    model = ddm_dit()
    init_from(model, str(tmp_path / "pipe"), Store(str(tmp_path)))
    assert torch.equal(ddm_out(model, *inputs()), diffusers_out(reference, *inputs()))

    half = diffusers_dit(tmp_path / "half", 1e-6, out_channels=C, in_channels=C, max_shard_size="40KB")
    assert (tmp_path / "half" / "diffusion_pytorch_model.safetensors.index.json").exists()
    half = half.to(torch.float16)
    half.save_pretrained(str(tmp_path / "half"), max_shard_size="40KB")
    model = ddm_dit()
    record = init_from(model, str(tmp_path / "half"), Store(str(tmp_path)))
    upcast = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "half"), torch_dtype=torch.float32)
    assert torch.equal(ddm_out(model, *inputs()), diffusers_out(upcast.eval(), *inputs()))  # the same fp16 values
    assert not any("learned sigma" in n for n in record["notes"]) and any("sharded" in n for n in record["notes"])


def test_what_does_not_map_is_refused_before_anything_loads(tmp_path):
    diffusers_dit(tmp_path / "a")
    store = Store(str(tmp_path))
    one = dict(channels=1)
    with pytest.raises(ValueError, match=r"set model.time_freq_shift=1 for this job"):
        init_from(ddm_dit(time_freq_shift=0, **one), str(tmp_path / "a"), store)
    with pytest.raises(ValueError, match=r"do not fit this job's model: .*of another shape"):
        init_from(ddm_dit(arch="DiT-Tiny/4", **one), str(tmp_path / "a"), store)
    diffusers_dit(tmp_path / "heads", heads=4)  # the same tensor shapes, another split into heads
    with pytest.raises(ValueError, match=r"4 attention heads, this job's model 2"):
        init_from(ddm_dit(**one), str(tmp_path / "heads"), store)
    diffusers_dit(tmp_path / "b", same_embeddings=False)
    with pytest.raises(ValueError, match=r"blocks 0 and 1 hold different norm1.emb.*shares one timestep"):
        init_from(ddm_dit(**one), str(tmp_path / "b"), store)
    with pytest.raises(ValueError, match=r"these are diffusers' parameter names; give the folder"):
        init_from(ddm_dit(**one), str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"), store)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    refused = {
        "unet": ({"_class_name": "UNet2DConditionModel"}, r"a diffusers UNet2DConditionModel; ddm starts from"),
        "gelu": ({"activation_fn": "gelu"}, r"activation_fn='gelu': not the DiT"),
        "old-512": ({"_class_name": "Transformer2DModel", "sample_size": 128}, r"interpolation_scale=2"),
    }
    for name, (changes, message) in refused.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(ValueError, match=message):
            check_source(str(tmp_path / name), store)  # before any worker starts
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.safetensors .*safetensors only"):
        check_source(str(tmp_path / "bin"), store)


def test_a_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"could not fetch facebook/DiT-XL-2-256 .*huggingface-cli download"):
        init_from(ddm_dit(), "hf://facebook/DiT-XL-2-256", Store(str(tmp_path)))


def dit_repository_state(depth=2, hidden=64, patch=2, channels=C, classes=10, tokens=16) -> dict:
    """Names and shapes of a facebookresearch/DiT state dict (learn_sigma=True, class dropout > 0),
    written down from that repository's models.py, not from ddm: timm's PatchEmbed and Mlp, its
    Attention's fused qkv, affine-free LayerNorms, the fixed pos_embed Parameter."""
    d = hidden
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, channels, patch, patch), "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (patch**2 * 2 * channels, d),
        "final_layer.linear.bias": (patch**2 * 2 * channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }  # fmt: skip
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d), f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }  # fmt: skip
    g = torch.Generator().manual_seed(3)
    state = {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}
    state["pos_embed"] = ddm_dit(time_freq_shift=0, channels=channels).pos_embed.clone()  # DiT's fixed sin-cos
    return state


def dit_repository_forward(state: dict, x, t, y, channels=C, patch=2):
    """The noise half of DiT's output, through ddm's trunk loaded with every tensor but the output
    layer, then DiT's own final layer and unpatchify (models.py: reshape (N, h, w, p, p, 2C),
    einsum 'nhwpqc->nchpwq'), its first C channels."""
    from ddm.models.layers import FinalLayer

    net = ddm_dit(time_freq_shift=0, channels=channels)
    net.final_layer = FinalLayer(64, patch * patch * 2 * channels)
    net.load_state_dict({k: v for k, v in state.items() if k != "pos_embed"})
    with torch.no_grad():
        c = net.condition(t, y)
        out = net.final_layer(net.run_blocks(net.x_embedder(x) + net.pos_embed, c), c)
        h = w = int(out.shape[1] ** 0.5)
        out = out.reshape(out.shape[0], h, w, patch, patch, 2 * channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], 2 * channels, h * patch, w * patch)
    return out[:, :channels]


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint", "safetensors"])
def test_a_facebookresearch_dit_checkpoint_keeps_its_noise_prediction(tmp_path, layout):
    """A DiT checkpoint with learned sigma (2C outputs) loads into ddm's DiT (C outputs): every name
    has its place, ddm's output is the checkpoint's noise half; a training checkpoint (with the DiT
    repository's argparse arguments) gives its EMA; the stored positions are checked, not loaded."""
    state = dit_repository_state()
    path = tmp_path / ("dit.safetensors" if layout == "safetensors" else "dit.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif layout == "training_checkpoint":
        wrong = {k: torch.zeros_like(v) for k, v in state.items()}
        torch.save({"model": wrong, "ema": state, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    else:
        torch.save(state, path)
    model = ddm_dit(time_freq_shift=0)
    record = init_from(model, str(path), Store(str(tmp_path)))
    x, steps, y = inputs()
    assert torch.equal(ddm_out(model, x, steps, y), dit_repository_forward(state, x, steps.float() / 1000, y))
    assert record["format"] == "facebookresearch/DiT" and record["url"] == str(path)
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any("pos_embed" in n for n in record["notes"]) and any("learned sigma" in n for n in record["notes"])
    assert any("EMA" in n for n in record["notes"]) == (layout == "training_checkpoint")
    with pytest.raises(ValueError, match=r"set model.time_freq_shift=0"):
        init_from(ddm_dit(time_freq_shift=1), str(path), Store(str(tmp_path)))


class Payload:
    """Not a tensor, not an argparse.Namespace: torch's weights_only unpickler must refuse it."""


def test_a_checkpoint_with_code_or_other_positions_is_refused(tmp_path):
    state = dit_repository_state()
    store = Store(str(tmp_path))
    torch.save({**state, "pos_embed": state["pos_embed"] + 1}, tmp_path / "moved.pt")
    with pytest.raises(ValueError, match=r"positional embedding .* is not the fixed sin-cos one"):
        init_from(ddm_dit(time_freq_shift=0), str(tmp_path / "moved.pt"), store)
    torch.save({"model": state, "args": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of tensors only"):
        init_from(ddm_dit(time_freq_shift=0), str(tmp_path / "pickled.pt"), store)


def test_a_missing_source_is_named_before_any_worker_starts(tmp_path):
    """``check_inputs`` asks ``check_source``: the file, the diffusers config and weights or the
    committed ddm export must be there; nothing is read beyond that."""
    store = Store(str(tmp_path))
    diffusers_dit(tmp_path / "dit")
    check_source(str(tmp_path / "dit"), store)
    check_source("dit", store)  # relative: inside the job's store
    torch.save(dit_repository_state(), tmp_path / "dit.pt")
    check_source("dit.pt", store)
    check_source(f"file://{tmp_path}/dit.pt", store)
    with pytest.raises(ValueError, match=r"init_from=absent.pt: no such file .*inside the job's store"):
        check_source("absent.pt", store)
    with pytest.raises(ValueError, match=r"init_from=monolith: neither a checkpoint .*train the source first"):
        check_source("monolith", store)


def test_a_pixart_transformer_starts_a_text_dit_that_computes_what_diffusers_computes(tmp_path):
    """A diffusers PixArtTransformer2DModel of DiT-Tiny/2's size (random weights, T5-like captions 16
    wide and 6 long) loaded into ddm's text DiT gives diffusers' outputs (its noise half) on the
    same latents, timesteps and masked captions; PixArt's settings that ddm does not compute, and a
    class-conditional job, are refused."""
    from ddm.models.config import TextConfig
    from ddm.models.text_encoder import TextEmbedding

    torch.manual_seed(0)
    reference = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=C, out_channels=2 * C, num_layers=2,
        cross_attention_dim=64, sample_size=8, patch_size=2, caption_channels=16, use_additional_conditions=False,
    )  # fmt: skip
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(str(tmp_path / "pixart"))
    reference.eval()
    text = TextConfig(encoder="t5", dim=16, length=6, pooled=False)
    model = build_model(ModelConfig("DiT-Tiny/2", (C, 8, 8), text=text)).eval()
    record = init_from(model, str(tmp_path / "pixart"), Store(str(tmp_path)))
    assert record["format"] == "diffusers PixArtTransformer2DModel"
    assert any("learned sigma" in n for n in record["notes"]) and any("null caption" in n for n in record["notes"])
    g = torch.Generator().manual_seed(1)
    x, steps = torch.randn(3, C, 8, 8, generator=g), torch.tensor([1, 400, 999])
    tokens, mask = torch.randn(3, 6, 16, generator=g), torch.arange(6)[None] < torch.tensor([[6], [3], [1]])
    with torch.no_grad():
        want = reference(x, encoder_hidden_states=tokens, timestep=steps, encoder_attention_mask=mask.long(),
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :C]  # fmt: skip
        got = model(x, steps.float() / 1000, TextEmbedding(tokens, mask, torch.zeros(3, 16)))
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    with pytest.raises(ValueError, match="PixArt has no pooled caption path: set model.text.pooled=false"):
        pooled = build_model(ModelConfig("DiT-Tiny/2", (C, 8, 8), text=TextConfig(encoder="t5", dim=16, length=6)))
        init_from(pooled, str(tmp_path / "pixart"), Store(str(tmp_path)))
    with pytest.raises(ValueError, match="starts a cross-attention text DiT .*, not an MMDiT"):
        mmdit = build_model(ModelConfig("MMDiT-Tiny/2", (C, 8, 8), text=text))
        init_from(mmdit, str(tmp_path / "pixart"), Store(str(tmp_path)))
    with pytest.raises(ValueError, match="a PixArt transformer starts text DiTs only"):
        init_from(ddm_dit(time_freq_shift=0), str(tmp_path / "pixart"), Store(str(tmp_path)))
    config = json.loads((tmp_path / "pixart" / "config.json").read_text())
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps({**config, "sample_size": 128,
                                                             "use_additional_conditions": None}))  # fmt: skip
    with pytest.raises(ValueError, match=r"use_additional_conditions=True, interpolation_scale=2: not the PixArt"):
        check_source(str(tmp_path / "big"), Store(str(tmp_path)))
