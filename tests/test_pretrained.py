"""Pretrained weights from outside ddm (``ddm.models.pretrained``): diffusers' DiT, proven against
diffusers' own model on the same inputs; facebookresearch/DiT checkpoints with their learned sigma;
the refusals that keep a wrong start from training."""

from __future__ import annotations

import json

import pytest
import torch

from ddm.exports import init_from_export
from ddm.models.build import build_model
from ddm.models.config import ModelConfig
from ddm.store import Store
from tests.helpers import diffusers_dit

diffusers = pytest.importorskip("diffusers")  # the test extra installs it (ddm[encoders])


def ddm_dit(time_freq_shift: int = 1, arch: str = "DiT-Tiny/2"):
    return build_model(ModelConfig(arch, (1, 8, 8), num_classes=10, time_freq_shift=time_freq_shift)).eval()


INPUTS = (
    torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
    torch.tensor([0, 1, 250, 500, 999]),
    torch.tensor([0, 3, 7, 9, 10]),
)  # fmt: skip  (labels: 10 is the null class)


@pytest.mark.parametrize("norm_eps, tolerance", [(1e-6, 0.0), (1e-5, 2e-5)])
def test_a_diffusers_dit_computes_what_diffusers_computes(tmp_path, norm_eps, tolerance):
    """ddm's DiT loaded from a diffusers folder gives diffusers' outputs on the same inputs (its
    noise half: the learned sigma is dropped): exactly with DiT's norm eps 1e-6, to 1e-6 of the
    output's size with diffusers' default 1e-5 before each feed-forward."""
    reference = diffusers_dit(tmp_path, norm_eps)
    model = ddm_dit()
    record = init_from_export(model, str(tmp_path), Store(str(tmp_path)))
    x, steps, y = INPUTS
    with torch.no_grad():
        want = reference(x, timestep=steps, class_labels=y).sample[:, :1]
        got = model(x, steps.float() / 1000, y)  # ddm's time t in [0, 1] is DiT's step / 1000
    assert want.abs().max() > 0.5  # not a trivially zero output
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()
    assert record["format"] == "diffusers DiTTransformer2DModel" and record["url"] == str(tmp_path)
    assert (
        record["sha256"]
        == __import__("hashlib").sha256((tmp_path / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    )
    assert any("learned sigma" in n for n in record["notes"])
    assert any("normalises" in n for n in record["notes"]) == (norm_eps != 1e-6)


def test_a_pipeline_folder_starts_from_its_transformer(tmp_path):
    reference = diffusers_dit(tmp_path / "transformer", 1e-6)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    model = ddm_dit()
    init_from_export(model, str(tmp_path), Store(str(tmp_path)))
    x, steps, y = INPUTS
    with torch.no_grad():
        assert torch.equal(
            model(x, steps.float() / 1000, y), reference(x, timestep=steps, class_labels=y).sample[:, :1]
        )


def test_what_does_not_map_is_refused_before_anything_loads(tmp_path):
    diffusers_dit(tmp_path / "a")
    store = Store(str(tmp_path))
    with pytest.raises(ValueError, match=r"set model.time_freq_shift=1 for this job"):
        init_from_export(ddm_dit(time_freq_shift=0), str(tmp_path / "a"), store)
    with pytest.raises(ValueError, match=r"do not fit this job's model: .*of another shape"):
        init_from_export(ddm_dit(arch="DiT-Tiny/4"), str(tmp_path / "a"), store)
    diffusers_dit(tmp_path / "b", same_embeddings=False)
    with pytest.raises(ValueError, match=r"blocks 0 and 1 hold different norm1.emb.*shares one timestep"):
        init_from_export(ddm_dit(), str(tmp_path / "b"), store)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({**config, "_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match=r"PixArt transformer is text-conditioned"):
        init_from_export(ddm_dit(), str(tmp_path / "c"), store)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no diffusion_pytorch_model.safetensors .*safetensors only"):
        init_from_export(ddm_dit(), str(tmp_path / "d"), store)


def test_a_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"could not fetch facebook/DiT-XL-2-256 .*huggingface-cli download"):
        init_from_export(ddm_dit(), "hf://facebook/DiT-XL-2-256", Store(str(tmp_path)))


class LearnedSigmaDiT(torch.nn.Module):
    """A DiT as facebookresearch/DiT builds it with learn_sigma=True: 2C output channels (noise,
    then the variance interpolation), ddm's trunk, the same parameter names, and the fixed
    positions stored in its state dict."""

    def __init__(self):
        super().__init__()
        from ddm.models.layers import FinalLayer

        self.net = ddm_dit(time_freq_shift=0)
        self.net.final_layer = FinalLayer(64, 2 * 2 * 2)  # patch 2 x 2, 2C = 2 channels
        torch.manual_seed(3)
        with torch.no_grad():
            for p in self.net.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def state_dict_as_dit(self) -> dict:
        return {**self.net.state_dict(), "pos_embed": self.net.pos_embed.clone()}

    def forward(self, x, t, y):
        n = self.net
        tokens = n.run_blocks(n.x_embedder(x) + n.pos_embed, n.condition(t, y))
        out = n.final_layer(tokens, n.condition(t, y))  # (N, T, p*p*2C), channel fastest
        h = w = int(out.shape[1] ** 0.5)
        out = out.reshape(out.shape[0], h, w, 2, 2, 2)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], 2, h * 2, w * 2)


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint", "safetensors"])
def test_a_facebookresearch_dit_checkpoint_keeps_its_noise_prediction(tmp_path, layout):
    """A DiT checkpoint with learned sigma (2C outputs) loads into ddm's DiT (C outputs): ddm's
    output is the checkpoint's noise half; a training checkpoint gives its EMA; the stored
    positions are checked, not loaded."""
    reference = LearnedSigmaDiT().eval()
    state = reference.state_dict_as_dit()
    path = tmp_path / ("dit.safetensors" if layout == "safetensors" else "dit.pt")
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif layout == "training_checkpoint":
        wrong = {k: torch.zeros_like(v) for k, v in state.items()}
        torch.save({"model": wrong, "ema": state, "opt": {}, "args": None}, path)
    else:
        torch.save(state, path)
    model = ddm_dit(time_freq_shift=0)
    record = init_from_export(model, str(path), Store(str(tmp_path)))
    x, steps, y = INPUTS
    with torch.no_grad():
        assert torch.equal(model(x, steps.float() / 1000, y), reference(x, steps.float() / 1000, y)[:, :1])
    assert record["format"] == "facebookresearch/DiT" and record["url"] == str(path)
    assert any("pos_embed" in n for n in record["notes"]) and any("learned sigma" in n for n in record["notes"])
    assert any("EMA" in n for n in record["notes"]) == (layout == "training_checkpoint")
    with pytest.raises(ValueError, match=r"set model.time_freq_shift=0"):
        init_from_export(ddm_dit(time_freq_shift=1), str(path), Store(str(tmp_path)))


def test_a_checkpoint_with_code_or_other_positions_is_refused(tmp_path):
    state = LearnedSigmaDiT().state_dict_as_dit()
    torch.save({**state, "pos_embed": state["pos_embed"] + 1}, tmp_path / "moved.pt")
    with pytest.raises(ValueError, match=r"positional embedding .* is not the fixed sin-cos one"):
        init_from_export(ddm_dit(time_freq_shift=0), str(tmp_path / "moved.pt"), Store(str(tmp_path)))
    torch.save({"model": state, "args": __import__("argparse").Namespace(x=1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of tensors only"):
        init_from_export(ddm_dit(time_freq_shift=0), str(tmp_path / "pickled.pt"), Store(str(tmp_path)))
    with pytest.raises(ValueError, match=r"no such file"):
        init_from_export(ddm_dit(time_freq_shift=0), str(tmp_path / "absent.pt"), Store(str(tmp_path)))


def test_a_missing_source_is_named_before_any_worker_starts(tmp_path):
    """``check_inputs`` asks ``check_source``: the file, the diffusers config or the committed ddm
    export must be there; nothing is read beyond that."""
    from ddm.models.pretrained import check_source

    store = Store(str(tmp_path))
    diffusers_dit(tmp_path / "dit")
    check_source(str(tmp_path / "dit"), store)
    check_source("dit", store)  # relative: inside the job's store
    torch.save(LearnedSigmaDiT().state_dict_as_dit(), tmp_path / "dit.pt")
    check_source("dit.pt", store)
    with pytest.raises(ValueError, match=r"init_from=absent.pt: no such file .*inside the job's store"):
        check_source("absent.pt", store)
    with pytest.raises(ValueError, match=r"init_from=monolith: .*has no committed export.*train the source first"):
        check_source("monolith", store)
