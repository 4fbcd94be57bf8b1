"""What ddm reads from the store, or fetches from outside, is checked before use (issue 34):

- a text encoder in the store is verified file by file against its MANIFEST.json; the encoder
  digests each export recorded are compared with the encoder that samples or evaluates;
- ensemble.json is parsed once, into one clear error naming the file when it is broken, written by
  a newer ddm, or holds a name that would reach outside the store or the cache;
- hub weights (DINOv2, SD-VAE) come at a pinned revision and as safetensors only;
- pytorch-fid's Inception weights are read without running any pickled code, checked by sha256.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from ddm.store import ChecksumError, Store
from ddm.store.layout import ENSEMBLE_FILE, UnsafeName
from tests.helpers import digits_store

CAPTIONS = ["digit 3 in bold", "uppercase R thin", "lowercase q italic"]


def tiny_encoder(folder, seed: int = 0) -> str:
    from ddm.models.text_encoder import make_tiny

    return make_tiny(str(folder), CAPTIONS, hidden_size=16, layers=1, heads=2, max_length=8, seed=seed)


def publish(local: str, store: Store, folder: str = "text_encoder", commit: bool = True) -> None:
    """A local encoder folder into the store, committed as ``ddm run`` commits its tiny one."""
    known = {n: store.put_file(os.path.join(local, n), f"{folder}/{n}") for n in sorted(os.listdir(local))}
    if commit:
        store.commit(folder, list(known), known=known)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return tiny_encoder(root / "a", seed=0), tiny_encoder(root / "b", seed=1)


def _flip_last_byte(store: Store, rel: str) -> None:
    data = bytearray(store.read_bytes(rel))
    data[-1] ^= 0x01  # a weight's last byte: still a valid safetensors file, another model
    store.write_bytes(rel, bytes(data))


# --- text encoders read from the store ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "memory"])
def test_a_store_text_encoder_is_verified_against_its_manifest(encoders, tmp_path, backend):
    from ddm.models.text_encoder import TextEncoder

    url = str(tmp_path / "run") if backend == "file" else f"memory://trust-{os.getpid()}-{tmp_path.name}"
    store = Store(url)
    publish(encoders[0], store)
    store.write_bytes("text_encoder/added_tokens.json", b'{"zebra": 5}')  # not in the manifest: never read
    good = TextEncoder.load("store:text_encoder", store=url)
    assert "added_tokens.json" not in good.describe()["sha256"]
    assert (
        good.describe()["sha256"]["model.safetensors"]
        == TextEncoder.load(encoders[0]).describe()["sha256"]["model.safetensors"]
    )
    _flip_last_byte(store, "text_encoder/model.safetensors")
    with pytest.raises(ChecksumError, match=r"text encoder 'store:text_encoder'.*model\.safetensors"):
        TextEncoder.load("store:text_encoder", store=url)


def test_a_store_text_encoder_without_a_manifest_is_refused(encoders, tmp_path):
    from ddm.models.text_encoder import TextEncoder, check

    store = Store(str(tmp_path / "run"))
    publish(encoders[0], store, commit=False)
    with pytest.raises(ValueError, match=r"store:text_encoder.*no MANIFEST\.json"):
        TextEncoder.load("store:text_encoder", store=store.url)
    with pytest.raises(ValueError, match=r"store:text_encoder.*no MANIFEST\.json"):
        check("store:text_encoder", 16, 8, store.url)  # before any worker starts


def test_check_encoder_compares_the_recorded_digests(encoders):
    from ddm.models.text_encoder import TextEncoder, check_encoder

    a, b = TextEncoder.load(encoders[0]), TextEncoder.load(encoders[1])
    check_encoder(a.describe(), a, "experts/00/export/config.json")
    check_encoder(None, a, "an export of ddm 0.1")  # nothing recorded: nothing to compare
    check_encoder(a.describe(), a.describe(), "data/MANIFEST.json")  # two records (stored embeddings)
    with pytest.raises(ValueError, match=r"init_from=experts/00.*model\.safetensors"):
        check_encoder(a.describe(), b.describe(), "init_from=experts/00")
    with pytest.raises(ValueError, match=r"experts/00/export/config\.json.*model\.safetensors"):
        check_encoder(a.describe(), b, "experts/00/export/config.json")
    with pytest.raises(ValueError, match="experts/01.*revision"):
        check_encoder({**a.describe(), "sha256": None, "revision": "a" * 40}, a, "experts/01")


def _text_exports(store: Store, record: dict) -> dict:
    """Export folders whose config.json records ``record`` as their text encoder (the weights
    are not needed to check the encoder), and the ensemble description naming them."""
    for d in ("experts/00", "router"):
        store.write_json(f"{d}/export/config.json", {"job": "expert", "text_encoder": record})
        store.commit(f"{d}/export", ["config.json"])
    entry = {"sha256": "0" * 64, "step": 1}
    return {
        "text": {"encoder": "store:text_encoder", "dim": 16, "length": 8},
        "experts": [{"dir": "experts/00", **entry}],
        "router": {"dir": "router", **entry},
    }


def test_sampling_checks_the_encoder_against_what_the_exports_recorded(encoders, tmp_path):
    from ddm.ensemble.sample import prompted
    from ddm.ensemble.settings import SampleConfig
    from ddm.models.text_encoder import TextEncoder

    store = Store(str(tmp_path / "run"))
    publish(encoders[0], store)
    loaded = TextEncoder.load("store:text_encoder", 8, store=store.url).describe()
    desc = _text_exports(store, loaded)
    cfg = SampleConfig(prompts=["digit 3"], num_samples=2)
    pairs, captions, _ = prompted(desc, cfg, "cpu", store.url)
    assert len(pairs) == 2 and captions(slice(0, 2)).tokens.shape == (2, 8, 16)
    other = TextEncoder.load(encoders[1], 8).describe()
    desc = _text_exports(store, {**loaded, "sha256": other["sha256"]})  # trained with another encoder
    with pytest.raises(ValueError, match=r"experts/00.*model\.safetensors"):
        prompted(desc, cfg, "cpu", store.url)


# --- ensemble.json -----------------------------------------------------------------------------


@pytest.fixture
def old_store(tmp_path) -> Store:
    return Store(digits_store(str(tmp_path)))


def _edit(store: Store, change) -> None:
    desc = store.read_json(ENSEMBLE_FILE)
    change(desc)
    store.write_json(ENSEMBLE_FILE, desc)


def test_a_truncated_ensemble_file_is_one_error_naming_it(old_store):
    from ddm.ensemble.assemble import load_ensemble

    old_store.write_bytes(ENSEMBLE_FILE, old_store.read_bytes(ENSEMBLE_FILE)[:40])
    with pytest.raises(ValueError, match=rf"{old_store.url}/ensemble\.json is not a valid ensemble description"):
        load_ensemble(old_store)


def test_ensemble_names_that_escape_are_refused_before_use(old_store, tmp_path):
    from ddm.ensemble.assemble import load_ensemble

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"someone else's weights")
    cache = tmp_path / "cache"
    _edit(old_store, lambda d: d["router"].update(sha256="../victim"))
    with pytest.raises(UnsafeName, match=r"ensemble\.json.*router.*sha256"):
        load_ensemble(old_store, cache_dir=str(cache))
    assert victim.read_bytes() == b"someone else's weights"  # the cache never deleted it
    for bad in ("../../etc", "/etc/passwd", "experts/../../x"):
        _edit(old_store, lambda d: (d["router"].update(sha256="a" * 64), d["experts"][1].update(dir=bad)))
        with pytest.raises(UnsafeName, match=r"ensemble\.json.*experts\[1\]"):
            load_ensemble(old_store)


def test_an_ensemble_written_by_a_newer_ddm_is_refused_as_such(old_store):
    from ddm.ensemble.assemble import load_ensemble

    _edit(old_store, lambda d: d.update(format_version=2, ddm_version="0.9.1"))
    with pytest.raises(ValueError, match=r"ensemble\.json was written by ddm 0\.9\.1; this is ddm 0\.2\.0"):
        load_ensemble(old_store)


def test_assemble_records_its_version_and_keeps_an_older_equal_file(old_store):
    from ddm import __version__
    from ddm.ensemble.assemble import assemble, load_ensemble

    before = old_store.read_bytes(ENSEMBLE_FILE)
    assert assemble(old_store) == json.loads(before)  # ddm 0.1's file, the same ensemble: kept as it is
    assert old_store.read_bytes(ENSEMBLE_FILE) == before
    desc = assemble(old_store, "full", replace=True)
    assert desc["ddm_version"] == __version__ and old_store.read_json(ENSEMBLE_FILE) == desc
    assert load_ensemble(old_store).description == desc
    broken = old_store.read_bytes(ENSEMBLE_FILE)[:50]
    old_store.write_bytes(ENSEMBLE_FILE, broken)
    with pytest.raises(ValueError, match=r"ensemble\.json is not a valid ensemble description.*--replace"):
        assemble(old_store, "full")
    assert assemble(old_store, "full", replace=True) == desc  # written again; the broken bytes kept aside
    kept = [n for n in old_store.list("") if n.startswith("ensemble.") and n != ENSEMBLE_FILE]
    assert [old_store.read_bytes(n) for n in kept if old_store.read_bytes(n) == broken] == [broken]


def test_assemble_refuses_experts_trained_with_different_encoder_files(encoders):
    from ddm.ensemble.assemble import _same_encoder
    from ddm.models.text_encoder import TextEncoder

    a, b = TextEncoder.load(encoders[0]).describe(), TextEncoder.load(encoders[1]).describe()
    b["spec"] = a["spec"]  # one name, other files
    expert = lambda d, rec: {"dir": d, "config": {"text_encoder": rec}}  # noqa: E731
    _same_encoder([expert("experts/00", a), expert("experts/01", dict(a))], {})
    with pytest.raises(ValueError, match="experts/01 and experts/00 recorded different text encoders"):
        _same_encoder([expert("experts/00", a), expert("experts/01", b)], {})
    with pytest.raises(ValueError, match="router and experts/00 recorded different text encoders"):
        _same_encoder([expert("experts/00", a)], {"text_encoder": b})


# --- hub weights: pinned revision, safetensors only --------------------------------------------


def _hub_snapshot(cache, repo: str, revision: str, files: dict[str, str], main: bool = False) -> None:
    """A Hugging Face cache entry (what a download leaves) holding ``files`` (name -> local path)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / revision
    snap.mkdir(parents=True)
    for name, path in files.items():
        shutil.copy(path, snap / name)
    if main:
        (entry / "refs").mkdir(exist_ok=True)
        (entry / "refs" / "main").write_text(revision)


def test_dinov2_loads_its_pinned_revision_as_safetensors_only(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from ddm.data.encoders import DEFAULT_DINOV2, DINOV2_REVISION, DINOv2Model

    assert len(DINOV2_REVISION) == 40 and int(DINOV2_REVISION, 16) >= 0  # a commit, not a branch
    saved = tmp_path / "saved"
    Dinov2Model(Dinov2Config(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
                ).save_pretrained(saved, safe_serialization=True)  # fmt: skip
    cache = tmp_path / "hub"
    config, weights = str(saved / "config.json"), str(saved / "model.safetensors")
    _hub_snapshot(cache, DEFAULT_DINOV2, "b" * 40, {"config.json": config, "model.safetensors": weights}, main=True)
    with pytest.raises(ValueError, match=rf"DINOv2 weights 'facebook/dinov2-small' at revision {DINOV2_REVISION}"):
        DINOv2Model("dinov2", cache_dir=str(cache))  # the hub's main moved on: not taken
    torch.save(Dinov2Model.from_pretrained(saved).state_dict(), tmp_path / "pytorch_model.bin")
    _hub_snapshot(
        cache,
        DEFAULT_DINOV2,
        DINOV2_REVISION,
        {"config.json": config, "pytorch_model.bin": str(tmp_path / "pytorch_model.bin")},
    )
    with pytest.raises(ValueError, match="could not load the DINOv2 weights"):
        DINOv2Model("dinov2", cache_dir=str(cache))  # pickled weights only: refused, never unpickled
    shutil.copy(weights, cache / "models--facebook--dinov2-small" / "snapshots" / DINOV2_REVISION)
    model = DINOv2Model("dinov2", cache_dir=str(cache))
    assert model.describe() == {"model": DEFAULT_DINOV2, "revision": DINOV2_REVISION}
    assert DINOv2Model(f"dinov2:{DEFAULT_DINOV2}@{'b' * 40}", cache_dir=str(cache)).describe()["revision"] == "b" * 40


def test_the_vae_is_pinned_and_named_with_its_revision_offline():
    from ddm.data.encoders import DEFAULT_VAE, VAE_REVISION, VAEEncoder, hub_model

    assert len(VAE_REVISION) == 40 and int(VAE_REVISION, 16) >= 0
    assert hub_model("vae", DEFAULT_VAE) == (DEFAULT_VAE, VAE_REVISION)
    assert hub_model(f"vae:{DEFAULT_VAE}", DEFAULT_VAE) == (DEFAULT_VAE, VAE_REVISION)
    assert hub_model("vae:org/other@v2", DEFAULT_VAE) == ("org/other", "v2")
    with pytest.raises(ValueError, match=rf"VAE weights 'stabilityai/sd-vae-ft-ema' at revision {VAE_REVISION}"):
        VAEEncoder("vae")  # offline (the tests set HF_HUB_OFFLINE)


def test_hub_weight_shard_names_are_checked(tmp_path):
    from ddm.models.pretrained import check_source

    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel",
                                                     "num_attention_heads": 2}))  # fmt: skip
    index = {"weight_map": {"a": "../../outside.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeName, match=r"diffusion_pytorch_model\.safetensors\.index\.json"):
        check_source(str(folder), Store(str(tmp_path)))


# --- FID: pytorch-fid's Inception weights without unpickling ---------------------------------------


class _Payload:
    """Pickled, it asks the unpickler to call ``open(marker, 'w')``: code that must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_fid_weights_are_read_without_running_pickled_code(tmp_path):
    from ddm.eval.metrics import load_state_dict_safely

    plain = tmp_path / "plain.pth"
    torch.save({"conv.weight": torch.ones(2, 3), "conv.bias": torch.zeros(2)}, plain)
    state = load_state_dict_safely(str(plain))
    assert set(state) == {"conv.weight", "conv.bias"} and torch.equal(state["conv.weight"], torch.ones(2, 3))
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.ones(1), "x": _Payload(str(marker))}, evil)
    with pytest.raises(ValueError, match=r"evil\.pth.*refus"):
        load_state_dict_safely(str(evil))
    assert not marker.exists()  # nothing ran
    from ddm.store.transfer import file_digest

    good = file_digest(str(plain))["sha256"]
    assert load_state_dict_safely(str(plain), good).keys() == state.keys()
    with pytest.raises(ValueError, match=rf"plain\.pth.*sha256 {good[:12]}"):
        load_state_dict_safely(str(plain), "f" * 64)


def test_fid_weights_in_the_torch_cache_are_checked_against_the_pinned_digest(tmp_path, monkeypatch):
    from ddm.eval.metrics import FID_WEIGHTS, FID_WEIGHTS_SHA256, FID_WEIGHTS_URL, fid_state_dict

    assert FID_WEIGHTS_URL.endswith(FID_WEIGHTS) and FID_WEIGHTS_SHA256.startswith(FID_WEIGHTS.split("-")[-1][:8])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save({"w": torch.ones(1)}, tmp_path / "hub" / "checkpoints" / FID_WEIGHTS)  # not the real file
    with pytest.raises(ValueError, match=rf"{FID_WEIGHTS}: sha256 .* expected {FID_WEIGHTS_SHA256[:12]}"):
        fid_state_dict(FID_WEIGHTS_URL)
    with pytest.raises(ValueError, match="pytorch-fid asked for"):
        fid_state_dict("https://example.com/other.pth")
