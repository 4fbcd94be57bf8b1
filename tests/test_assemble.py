"""Assembling an ensemble from exports in the store, and loading it lazily for sampling."""

import json
import os

import pytest
import torch

from ddm.ensemble.assemble import assemble, load_ensemble
from ddm.ensemble.cost import ensemble_sampling_cost, forward_flops_of
from ddm.models.config import ModelConfig, forward_flops
from ddm.models.flow import FlowMatching
from ddm.store import ChecksumError, Store
from ddm.store.layout import ENSEMBLE_FILE, ensemble_id
from tests.helpers import summary
from tests.test_train import fresh, prepared, run_cli  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):  # noqa: F811
    """Two tiny experts and a router, a few steps each (compatibility is what is tested here)."""
    store = fresh(prepared, tmp_path_factory.mktemp("assembled"))
    for part in (0, 1):
        summary(run_cli(store, f"partition={part}", "steps=2", "checkpoint.every=2"))
    summary(run_cli(store, "job=router", "steps=2", "checkpoint.every=2"))
    return store


def test_assemble_and_sample_lazily(trained):
    store = Store(trained)
    d = assemble(store, "top-2")
    assert d["num_experts"] == 2 and d["rule"] == "top-2" and d["data_shape"] == [1, 8, 8]
    assert assemble(store, "top-2") == d  # same inputs: nothing changes
    ens = load_ensemble(store, rule="oracle")
    assert not any(e.loaded for e in ens.experts)
    x = FlowMatching().sample(
        ens.velocity_fn(y=torch.arange(4), partition=torch.zeros(4, dtype=torch.long)), torch.randn(4, 1, 8, 8), 3
    )
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert [e.loaded for e in ens.experts] == [True, False]  # only the expert routed to was loaded
    top2 = load_ensemble(store)
    assert str(top2.rule) == "top-2"
    assert top2.velocity(torch.randn(3, 1, 8, 8), torch.full((3,), 0.5), torch.arange(3)).shape == (3, 1, 8, 8)


def test_a_different_ensemble_is_never_overwritten(trained):
    store = Store(trained)
    assemble(store, "top1", replace=True)
    before = store.read_bytes(ENSEMBLE_FILE)
    with pytest.raises(ValueError, match="already describes a different ensemble"):
        assemble(store, "full")
    assert store.read_bytes(ENSEMBLE_FILE) == before
    top1 = json.loads(before)
    assemble(store, "full", replace=True)
    assemble(store, "top1", replace=True)  # within the same second: the "full" copy must not overwrite anything
    kept = {n: store.read_json(n) for n in store.list("") if n.startswith("ensemble.") and n != ENSEMBLE_FILE}
    assert f"ensemble.{ensemble_id(top1)}.json" in kept and kept[f"ensemble.{ensemble_id(top1)}.json"] == top1
    assert {d["rule"] for d in kept.values()} >= {"top-1", "full"}


def test_missing_export_and_corruption_are_clear_errors(prepared, tmp_path):  # noqa: F811
    store_path = fresh(prepared, tmp_path)
    summary(run_cli(store_path, "partition=0", "steps=2", "checkpoint.every=2"))
    store = Store(store_path)
    with pytest.raises(ValueError, match="experts/01 has no committed export; train it first"):
        assemble(store)
    # Expert 1 is a DDPM expert (epsilon-prediction on the VP schedule), trained by the same loop, and
    # of another size (DiT-Micro/2 beside expert 0's DiT-Tiny/2): it mixes with the flow-matching
    # expert 0, converted to the ensemble's velocity at each step, and costs its own FLOPs.
    ddpm = ("flow.path=vp", "flow.prediction=epsilon", "flow.time_sampling=uniform", "model.arch=DiT-Micro/2",
            "model.learn_sigma=true")  # fmt: skip
    s = summary(run_cli(store_path, "partition=1", "steps=2", "checkpoint.every=2", *ddpm))
    assert 0 < s["final_loss"] < 10
    summary(run_cli(store_path, "job=router", "steps=2", "checkpoint.every=2"))
    desc = assemble(store)
    assert desc["flow"]["path"] == "linear" and "flow" not in desc["experts"][0]
    assert desc["experts"][1]["flow"]["prediction"] == "epsilon"  # converted where it is evaluated
    ens = load_ensemble(store, "full")
    v = ens.velocity(torch.randn(4, 1, 8, 8), torch.full((1,), 0.5).expand(4), torch.arange(4))
    assert v.shape == (4, 1, 8, 8) and torch.isfinite(v).all() and ens.stats.expert_evals[1] == 4
    sizes = [forward_flops(ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10)),
             forward_flops(ModelConfig("DiT-Micro/2", (1, 8, 8), num_classes=10, learn_sigma=True))]  # fmt: skip
    flops = forward_flops_of(store, desc)
    assert flops["experts"] == sizes and sizes[1] < sizes[0] / 2
    st = ens.stats  # the full rule: every expert on all 4 rows, once
    cost = ensemble_sampling_cost(flops["experts"], flops["router"], st.expert_evals, st.router_evals,
                                  st.velocity_evals, 1)  # fmt: skip
    assert cost["sampling_flops_per_sample"] == pytest.approx(sum(sizes) + flops["router"])
    config = os.path.join(store_path, "router", "export", "config.json")
    with open(config, "a") as f:
        f.write(" ")
    with pytest.raises(ChecksumError, match="config.json is corrupted"):
        assemble(store)


def test_export_changed_after_assembly_is_caught(trained, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    store = Store(str(copy))
    assemble(store, "top1", replace=True)
    summary(run_cli(str(copy), "partition=1", "steps=4", "checkpoint.every=2"))  # expert 1 trains on
    ens = load_ensemble(store, rule="oracle")
    with pytest.raises(ValueError, match="changed since the ensemble was assembled"):
        ens.velocity(
            torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.arange(2), partition=torch.ones(2, dtype=torch.long)
        )


def test_sample_writes_grid_and_arrays_and_never_mixes_configs(trained, tmp_path):
    import io as _io
    import shutil

    import numpy as np

    from ddm.ensemble.sample import SampleConfig, sample

    copy = tmp_path / "s"
    shutil.copytree(trained, copy)
    store = Store(str(copy))
    assemble(store, "top1", replace=True)
    meta = sample(store, SampleConfig(num_samples=10, steps=2, batch_size=4, guidance=2.0))
    assert meta["rule"] == "top-1" and meta["expert_forwards_per_sample"] == 2 * 2 * 2  # Heun x 2 steps x CFG
    out = meta["dir"]
    assert out.startswith("samples/top-1-s0-")  # filed under the ensemble's id
    x = np.load(_io.BytesIO(store.read_bytes(f"{out}/samples.npy")), allow_pickle=False)
    assert x.shape == (10, 1, 8, 8) and np.isfinite(x).all()
    assert store.read_bytes(f"{out}/grid.png")[:8] == b"\x89PNG\r\n\x1a\n"
    again = sample(store, SampleConfig(num_samples=10, steps=2, batch_size=4, guidance=2.0))
    assert again["config"] == meta["config"]  # same settings: reused
    with pytest.raises(ValueError, match="holds samples made with other settings"):
        sample(store, SampleConfig(num_samples=10, steps=3, batch_size=4, guidance=2.0, name=out.split("/", 1)[1]))


def test_export_cache_is_content_addressed_and_checked(trained, tmp_path):
    """Remote ensembles keep weights in a local cache keyed by sha256; a damaged entry is never used."""
    import hashlib

    store = Store(trained)
    assemble(store, "top1", replace=True)
    cache = tmp_path / "cache"
    ens = load_ensemble(store, cache_dir=str(cache))
    for e in ens.experts:
        e.load()
    desc = store.read_json(ENSEMBLE_FILE)
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted(f"{e['sha256']}.safetensors" for e in [*desc["experts"], desc["router"]])
    reference = {k: v.clone() for k, v in ens.experts[0].module.state_dict().items()}
    # Damage expert 0's cache entry: the load notices (sha256), drops it and reads the store again.
    entry = cache / f"{desc['experts'][0]['sha256']}.safetensors"
    raw = bytearray(entry.read_bytes())
    raw[-10] ^= 0xFF
    entry.write_bytes(bytes(raw))
    again = load_ensemble(store, cache_dir=str(cache)).experts[0].load()
    for k, v in again.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == desc["experts"][0]["sha256"]  # repaired
    # A healthy entry is used without reading the store's copy of the weights.
    os.rename(os.path.join(trained, "experts/00/export/model.safetensors"), tmp_path / "moved")
    try:
        load_ensemble(store, cache_dir=str(cache)).experts[0].load()
        with pytest.raises(ChecksumError):
            load_ensemble(store, cache_dir=None).experts[0].load()
    finally:
        os.rename(tmp_path / "moved", os.path.join(trained, "experts/00/export/model.safetensors"))


def test_assemble_checks_the_weights_against_each_config(trained, tmp_path):
    """A router's weights under an expert's config, with a manifest that agrees with the bytes: every
    checksum passes, so only reading the tensors against the config catches it, before ensemble.json."""
    import hashlib
    import shutil

    copy = tmp_path / "swapped"
    shutil.copytree(trained, copy)
    raw = (copy / "router/export/model.safetensors").read_bytes()
    (copy / "experts/01/export/model.safetensors").write_bytes(raw)
    manifest = json.loads((copy / "experts/01/export/MANIFEST.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (copy / "experts/01/export/MANIFEST.json").write_text(json.dumps(manifest))
    store = Store(str(copy))
    if store.exists(ENSEMBLE_FILE):
        store.delete(ENSEMBLE_FILE)
    with pytest.raises(ValueError, match=r"experts/01/export (lacks|holds) .*tensor '[\w.]+'"):
        assemble(store)
    assert not store.exists(ENSEMBLE_FILE)


def test_exports_describe_themselves_and_rebuild_without_ddm(trained):
    """config.json alone rebuilds an expert in plain PyTorch (examples/plain_dit.py, no ddm import)
    with the same outputs; every manifest says what it is."""
    import importlib.util

    from ddm.models.exports import load_export

    spec = importlib.util.spec_from_file_location(
        "plain_dit", os.path.join(os.path.dirname(__file__), "..", "examples", "plain_dit.py")
    )
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    store = Store(trained)
    rebuilt, config = plain.load(os.path.join(trained, "experts/00/export"))
    a = config["architecture"]
    assert (a["family"], a["depth"], a["hidden_size"], a["num_heads"], a["patch_size"]) == ("dit", 2, 64, 2, 2)
    assert a["null_label"] == 10 and config["probability_path"]["alpha"] == "1 - t"
    ours = load_export(store, "experts/00").eval()
    x, t, y = torch.randn(5, 1, 8, 8), torch.rand(5), torch.tensor([0, 3, 9, 10, 2])  # 10: the null label
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, y), ours(x, t, y), rtol=1e-5, atol=1e-6)
    assert plain.sample(rebuilt, config, n=4, steps=3).shape == (4, 1, 8, 8)
    router = json.loads(store.read_bytes("router/export/config.json"))["architecture"]
    assert router["family"] == "dit-router" and router["num_partitions"] == 2
    for run_dir in ("experts/00", "router"):
        assert store.child(run_dir).manifest("export")["kind"] == "ddm.export"
        steps = store.child(f"{run_dir}/checkpoints").list("")
        assert store.child(f"{run_dir}/checkpoints").manifest(steps[-1])["kind"] == "ddm.checkpoint"
    with pytest.raises(ValueError, match="dense DiT experts, not dit-router"):
        plain.PlainDiT(router)
