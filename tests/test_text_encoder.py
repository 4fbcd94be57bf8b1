"""Frozen text encoders: a tiny CLIP and T5 text model made from a dataset's captions (a word-level
tokenizer trained on them with the tokenizers library, random weights), saved as transformers saves
them and loaded back like any folder; hub ids fail offline with the way out."""

import json
import os

import pytest
import torch

from ddm.models.text_encoder import TextEncoder, make_tiny, parse

CAPTIONS = [
    "uppercase R in bold dejavu serif, large, thick strokes, leaning left",
    "digit 3 in computer modern roman, small, thin strokes, upright",
    "lowercase q in italic stixgeneral, medium, thin strokes, leaning right",
]


@pytest.fixture(scope="module", params=["clip", "t5"])
def tiny(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"tiny-{request.param}"))
    make_tiny(folder, CAPTIONS, kind=request.param, max_length=24)
    return request.param, folder


def test_a_tiny_encoder_loads_like_any_folder_and_encodes_each_caption_on_its_own(tiny):
    kind, folder = tiny
    enc = TextEncoder.load(folder)
    assert enc.kind == kind and enc.max_length == 24 and enc.hidden_size == 64
    emb = enc.encode([*CAPTIONS, ""])
    assert emb.tokens.shape == (4, 24, 64) and emb.pooled.shape == (4, 64) and emb.mask.dtype == torch.bool
    words = [len(c.replace(",", " ,").split()) for c in CAPTIONS]
    assert emb.mask.sum(1).tolist() == [w + 2 for w in words] + [2]  # [BOS] words [EOS]; "" is [BOS] [EOS]
    # A caption's embedding does not depend on its batch (ingest-time and in-job embeddings agree).
    alone = enc.encode([CAPTIONS[1]])
    assert torch.equal(alone.tokens[0], emb.tokens[1]) and torch.equal(alone.pooled[0], emb.pooled[1])
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])  # different captions, different embeddings
    # Frozen: no gradients, eval mode; the same folder gives the same embeddings; unknown words -> [UNK].
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training
    assert torch.equal(TextEncoder.load(folder).encode(CAPTIONS).tokens, emb.tokens[:3])
    assert "[UNK]" in enc.tokenizer.convert_ids_to_tokens(enc.tokenizer("digit 3 zebra")["input_ids"])
    d = enc.describe()
    assert d["kind"] == kind and d["spec"] == folder and len(d["sha256"]["model.safetensors"]) == 64
    # Many captions in chunks, each kept in host memory: the same embeddings, in order.
    chunked = enc.encode_to_cpu([*CAPTIONS, ""], chunk=3)
    assert all(torch.equal(getattr(chunked, f), getattr(emb, f)) for f in ("tokens", "mask", "pooled"))


def test_the_same_captions_and_seed_make_the_same_encoder(tiny, tmp_path):
    kind, folder = tiny
    again = make_tiny(str(tmp_path / "again"), CAPTIONS, kind=kind, max_length=24)
    assert TextEncoder.load(again).describe()["sha256"] == TextEncoder.load(folder).describe()["sha256"]


def test_hub_ids_fail_offline_with_the_way_out_and_bad_folders_are_named(tmp_path):
    assert parse("openai/clip-vit-large-patch14@abc123") == ("openai/clip-vit-large-patch14", "abc123", True)
    assert parse("hf://google/t5-v1_1-xl") == ("google/t5-v1_1-xl", None, True)
    with pytest.raises(ValueError, match=r"huggingface-cli download google/t5-v1_1-xl --revision main --local-dir"):
        TextEncoder.load("google/t5-v1_1-xl@main")  # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(ValueError, match="neither a folder that exists nor a hub id"):
        TextEncoder.load("clip-large")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="is a 'vit' model; ddm reads CLIP and T5 text encoders"):
        TextEncoder.load(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="is not a folder"):
        TextEncoder.load(str(tmp_path / "missing"))


def test_a_downloaded_folder_with_a_cache_folder_loads(tiny, tmp_path):
    """``huggingface-cli download --local-dir DIR`` leaves DIR/.cache/: the folder still loads, and
    only its own files are hashed."""
    import shutil

    _, folder = tiny
    copy = tmp_path / "downloaded"
    shutil.copytree(folder, copy)
    (copy / ".cache" / "huggingface").mkdir(parents=True)
    enc = TextEncoder.load(str(copy))
    assert set(enc.describe()["sha256"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert next(enc.model.parameters()).dtype == torch.float32


def test_an_encoder_in_a_store_url_is_checked_from_its_config_and_loads(tiny):
    """A folder at a store URL (here fsspec's memory://; s3:// alike): ``check`` reads its
    config.json alone, ``load`` copies it down and gives the local folder's embeddings."""
    import fsspec

    from ddm.models.text_encoder import check

    kind, folder = tiny
    url = f"memory://encoders/{kind}"
    fs = fsspec.filesystem("memory")
    fs.put(folder.rstrip("/") + "/", f"/encoders/{kind}/", recursive=True)
    fs.pipe(f"/encoders/{kind}/sub/weights.bin", b"not the encoder's")  # a sub-folder and a hidden file: skipped
    fs.pipe(f"/encoders/{kind}/.cache", b"")
    assert check(url, 64, 24)["model_type"] in ("clip_text_model", "t5")
    with pytest.raises(ValueError, match="makes 64-wide embeddings: set model.text.dim=64"):
        check(url, 32, 24)
    with pytest.raises(ValueError, match="has no config.json"):
        check("memory://encoders/none", 64, 24)
    remote = TextEncoder.load(url).encode(CAPTIONS)
    assert torch.equal(remote.tokens, TextEncoder.load(folder).encode(CAPTIONS).tokens)


def test_a_pipeline_repo_is_refused_from_its_model_index_before_any_weights(tmp_path):
    """A diffusers pipeline keeps its text encoder in a sub-folder: naming the pipeline is an error
    that says which folders to download, found from model_index.json alone (here in a hub cache
    read offline by huggingface_hub itself); its sub-folder weights are never fetched."""
    import subprocess
    import sys

    snap = tmp_path / "hub" / "models--org--pipe" / "snapshots" / ("a" * 40)
    (snap / "text_encoder").mkdir(parents=True)
    (snap / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (snap / "text_encoder" / "config.json").write_text('{"model_type": "clip_text_model", "hidden_size": 64}')
    (tmp_path / "hub" / "models--org--pipe" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--pipe" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    code = "from ddm.models.text_encoder import check\ncheck('org/pipe', 64, 24)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "is a diffusers pipeline: download its text encoder and tokenizer folders" in out.stderr, out.stderr[-2000:]
    assert "--include 'text_encoder/*' 'tokenizer/*'" in out.stderr


def test_store_names_resolve_against_the_store_that_names_them():
    from ddm.models.text_config import in_store

    assert in_store("store:text_encoder", "s3://b/run/") == "s3://b/run/text_encoder"
    assert in_store("store:te", "file:///") == "file:///te" and in_store("store:te", "memory:") == "memory://te"
    assert in_store("store:te", "runs/a") == os.path.join(os.getcwd(), "runs/a/te")  # a path, never a hub id
    assert in_store("/models/t5", "s3://b/run") == "/models/t5" and in_store("org/name@rev", None) == "org/name@rev"
    for bad, match in (("store:", "a folder inside the store"), ("store:../other", "a folder inside the store")):
        with pytest.raises(ValueError, match=match):
            in_store(bad, "s3://b/run")
    with pytest.raises(ValueError, match="no store was given"):
        in_store("store:text_encoder", None)
