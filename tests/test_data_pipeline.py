"""The data stage at cluster scale: WebDataset tar shards on the local S3 server, ingested and
partitioned as Ray Data pipelines on a local two-node Ray cluster (ray.cluster_utils.Cluster), against
the in-process path; a worker killed mid-ingest; the driver killed with -9 and a re-run that redoes
only the missing shards; features stored once and reused; encoders and feature extractors of the
real architectures (random weights) on actor pools."""

import io
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid

import numpy as np
import pytest

from ddm.core.config import load
from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.data.shards import Dataset, read_parquet_bytes
from ddm.store import Store
from ddm.store.layout import ASSIGNMENTS, DATA_DIR, FEATURES_DIR, PARTITIONS_DIR
from tests.conftest import BUCKET
from tests.helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARS, PER_TAR, SIDE = 5, 400, 48  # 2 000 PNGs in 5 tars


def png(rng, side: int, label: int) -> bytes:
    from PIL import Image

    img = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    img[: side // 2, :, label % 3] = 40 * label  # a class-dependent band: partitions have structure
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_webdataset(fs, root: str, tars: int = TARS, per: int = PER_TAR, seed: int = 0, extra=None) -> None:
    """``tars`` WebDataset shards of ``per`` samples each: <key>.png + <key>.cls."""
    rng = np.random.default_rng(seed)
    key = 0
    for t in range(tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for _ in range(per):
                label = int(rng.integers(5))
                members = {"png": png(rng, SIDE, label), "cls": str(label).encode()}
                if extra:
                    members = extra(key, members)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"sample{key:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                key += 1
        fs.pipe_file(f"{root}/train-{t:04d}.tar", buf.getvalue())


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """Two worker nodes of one CPU each (the head runs none); the S3 settings are in their environment."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": free_port()})
    c.add_node(num_cpus=1)
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def wds(s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = f"{BUCKET}/wds-{uuid.uuid4().hex[:8]}"
    make_webdataset(fs, root, extra=captioned)
    return f"s3://{root}"


def captioned(key: int, members: dict) -> dict:
    """A caption in <key>.txt, except for every 50th sample (40 of 2 000 without one)."""
    if key % 50 == 49:
        return members
    return {**members, "txt": f"  sample {key} of class {members['cls'].decode()}\n".encode()}


def cfg(source: str, **kw) -> IngestConfig:
    return IngestConfig(source=source, resolution=16, shard_size=250, caption="txt", **kw)


def shards(store: Store) -> dict[str, bytes]:
    ds = Dataset(store)
    return {name: store.read_bytes(f"{DATA_DIR}/{name}") for name in ds.shard_names}


@pytest.fixture(scope="module")
def reference(wds):
    """The in-process ingest of the WebDataset: what every other path must reproduce."""
    store = Store(f"s3://{BUCKET}/ref-{uuid.uuid4().hex[:8]}")
    manifest = ingest(cfg(wds, runner="local"), store)
    return store, manifest


def test_webdataset_on_two_nodes_equals_the_single_process_ingest(cluster, wds, reference):
    ref_store, ref = reference
    assert ref["num_samples"] == TARS * PER_TAR and ref["shard_rows"] == [250] * 8
    assert ref["class_names"] == ["0", "1", "2", "3", "4"] and ref["sample_shape"] == [3, 16, 16]
    store = Store(f"s3://{BUCKET}/ray-{uuid.uuid4().hex[:8]}")
    m = ingest(cfg(wds, runner="ray", workers=2), store)
    assert shards(store) == shards(ref_store)  # byte-identical, shard by shard
    for key in ("num_samples", "shard_rows", "shards", "label_counts", "class_names", "sample_shape", "captions"):
        assert m[key] == ref[key], key
    assert not store.exists(f"{DATA_DIR}/progress") and not store.exists(f"{DATA_DIR}/plan.json")
    # The labels are the .cls files, in tar order; the captions the .txt files, stripped, "" where none.
    first = Dataset(ref_store).read_shard(0)
    assert list(first.ids[:3]) == [0, 1, 2] and first.labels.dtype == np.int32
    assert first.captions[0] == f"sample 0 of class {first.labels[0]}" and first.captions[49] == ""
    assert ref["captions"]["empty"] == TARS * PER_TAR // 50 and ref["captions"]["source"] == "txt"


def test_a_worker_killed_mid_ingest_and_the_pipeline_completes(cluster, wds, reference):
    import psutil

    store = Store(f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:8]}")
    killed: list[str] = []
    done = threading.Event()

    def killer():
        while not done.is_set() and not killed:
            for p in psutil.process_iter(["name", "cmdline"]):
                title = " ".join(p.info["cmdline"] or [])
                if title.startswith("ray::") and "Map" in title:  # a worker running one of our units
                    p.send_signal(signal.SIGKILL)
                    killed.append(title)
                    break
            time.sleep(0.002)

    t = threading.Thread(target=killer)
    t.start()
    try:
        m = ingest(cfg(wds, runner="ray", workers=2), store)
    finally:
        done.set()
        t.join()
    assert killed, "no worker was caught running a unit"
    assert shards(store) == shards(reference[0]) and m["num_samples"] == TARS * PER_TAR


def test_driver_killed_and_the_rerun_redoes_only_missing_shards(cluster, wds, reference, tmp_path, caplog):
    url = f"s3://{BUCKET}/driver-{uuid.uuid4().hex[:8]}"
    store = Store(url)
    args = ["resolution=16", "shard_size=40", "runner=ray", "workers=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddm.cli", "ingest", wds, url, "--address", cluster.address, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.log", "wb"),
    )
    deadline = time.time() + 120
    records: list[str] = []
    while time.time() < deadline and proc.poll() is None:
        records = store.list(f"{DATA_DIR}/progress")
        if len(records) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-2000:]
    assert not store.is_committed(DATA_DIR)
    # Ray ends the dead driver's tasks soon after; a unit already writing may still commit: wait
    # until the committed set stops changing.
    listing, settle = None, time.time() + 30
    while time.time() < settle and listing != (listing := store.list(f"{DATA_DIR}/progress")):
        time.sleep(1.5)
    committed = {int(r.split(".")[0]) for r in listing}
    assert 3 <= len(committed) < 50  # 50 units of 40 samples: the kill came mid-ingest
    before = {i: store.read_json(f"{DATA_DIR}/progress/{i:05d}.json")["files"] for i in committed}

    caplog.set_level(logging.INFO, logger="ddm.data")
    # Same config; the dead driver's lease (its process is gone, on this machine) is taken at once.
    m = ingest(load(IngestConfig, None, [f"source={wds}", *args]), store)
    assert m["resumed_shards"] == len(committed)
    assert f"resuming: {len(committed)} of 50 units" in caplog.text
    assert {m["files"][n]["sha256"] for f in before.values() for n in f} <= {e["sha256"] for e in m["files"].values()}
    # The same data as the one-shot reference, cut into smaller shards.
    ds = Dataset(store)
    got = np.concatenate([ds.read_shard(i).arrays for i in range(ds.num_shards)])
    ref = Dataset(reference[0])
    want = np.concatenate([ref.read_shard(i).arrays for i in range(ref.num_shards)])
    assert np.array_equal(got, want)


def test_features_stored_once_and_reused_for_another_k(cluster, reference, caplog):
    store = reference[0]
    local = partition(PartitionConfig(num_partitions=3, num_fine=64, runner="local"), store, dry_run=True)
    feats = store.list(FEATURES_DIR)
    assert len(feats) == 1 and feats[0].startswith("pca-")
    listing = store.list(f"{FEATURES_DIR}/{feats[0]}")
    assert len([f for f in listing if f.startswith("part-")]) == 8
    caplog.set_level(logging.INFO, logger="ddm.partition")
    m = partition(PartitionConfig(num_partitions=3, num_fine=64, runner="ray"), store)  # assignment on Ray
    assert "reusing the stored features" in caplog.text and store.list(f"{FEATURES_DIR}/{feats[0]}") == listing
    assert m["counts"] == local["counts"] and sum(m["counts"]) == TARS * PER_TAR
    table = read_parquet_bytes(store.read_verified(PARTITIONS_DIR, ASSIGNMENTS))
    assert np.array_equal(np.sort(table.column("id").to_numpy()), np.arange(TARS * PER_TAR))
    # Another K and no balance: the same features, no new feature pass.
    other = partition(PartitionConfig(num_partitions=2, num_fine=64, balance=False), store, dry_run=True)
    assert sum(other["counts"]) == TARS * PER_TAR and store.list(FEATURES_DIR) == feats
    assert partition(PartitionConfig(num_partitions=3, num_fine=64, runner="ray"), store) == m  # committed: same


def test_vae_and_dinov2_of_the_real_architectures_on_actor_pools(cluster, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    stores = {}
    for runner in ("local", "ray"):
        stores[runner] = Store(str(tmp_path / runner))
        m = ingest(
            IngestConfig(source=str(root), resolution=32, shard_size=8, encoder="vae:random", runner=runner),
            stores[runner],
        )
        assert m["sample_shape"] == [4, 4, 4] and m["dtype"] == "float16" and m["num_samples"] == 24
    lat = {r: np.concatenate([Dataset(s).read_shard(i).arrays for i in range(3)]) for r, s in stores.items()}
    np.testing.assert_allclose(lat["ray"].astype(np.float32), lat["local"].astype(np.float32), atol=2e-2)
    assert np.abs(lat["local"]).max() > 0  # an encoder ran, not a copy

    pix = Store(str(tmp_path / "pixels"))
    ingest(IngestConfig(source=str(root), resolution=32, shard_size=8, runner="ray"), pix)
    m = partition(PartitionConfig(num_partitions=2, features="dinov2:random", embed_batch_size=4), pix)
    folder = m["features_dir"]
    assert folder.startswith(f"{FEATURES_DIR}/dinov2-") and pix.manifest(folder)["dim"] == 384
    feats = np.concatenate([_features(pix, folder, i) for i in range(3)])
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-4)  # pooled, L2-normalised


def _features(store: Store, folder: str, i: int) -> np.ndarray:
    from ddm.data.features import Features

    return Features(store, folder).read(i)


def test_address_and_dry_run_on_the_command_line(cluster, reference, capsys):
    from ddm.cli import main

    store = reference[0]
    args = ["partition", store.url, "--dry-run", "--address", cluster.address, "num_partitions=4", "num_fine=64"]
    assert main([*args, "runner=ray"]) == 0
    out = capsys.readouterr().out
    assert "4 partitions, sizes" in out and "dry run: nothing written" in out
    assert main(["partition", store.url, "--dry-run", "num_partitions=0"]) == 2  # a clear usage error
    assert "num_partitions must be >= 1" in capsys.readouterr().err
