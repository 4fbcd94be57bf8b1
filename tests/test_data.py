"""Data tier on three stores (file://, memory://, S3 via moto): ingest, partition, partition reader."""

import io

import numpy as np
import pytest

from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.data.reader import PartitionReader
from ddm.data.shards import Dataset, read_parquet_bytes, shard_name
from ddm.store import Store, StoreError
from ddm.store.layout import ASSIGNMENTS, CENTROIDS, DATA_DIR, PARTITIONS_DIR


def ingested(url: str, **kw) -> Store:
    store = Store(url)
    ingest(IngestConfig(**{"shard_size": 400, **kw}), store)
    return store


def assignments(store: Store) -> dict[str, np.ndarray]:
    table = read_parquet_bytes(store.read_verified(PARTITIONS_DIR, ASSIGNMENTS))
    return {name: table.column(name).to_numpy() for name in table.column_names}


# --- ingest -----------------------------------------------------------------------------------


def test_ingest_digits(store_url):
    from sklearn.datasets import load_digits

    store = ingested(store_url)
    m = store.verify(DATA_DIR)  # every shard's sha256 matches
    assert m["num_samples"] == 1797 and m["shard_rows"] == [400, 400, 400, 400, 197]
    assert m["sample_shape"] == [1, 8, 8] and m["dtype"] == "uint8" and m["num_classes"] == 10
    ds = Dataset(store)
    shards = [ds.read_shard(i) for i in range(ds.num_shards)]
    ids = np.concatenate([s.ids for s in shards])
    labels = np.concatenate([s.labels for s in shards])
    images = np.concatenate([s.arrays for s in shards])
    digits = load_digits()
    assert np.array_equal(ids, np.arange(1797))
    assert np.array_equal(labels, digits.target)
    np.testing.assert_allclose(images[:, 0] / 255.0 * 16.0, digits.images, atol=0.04)


def test_ingest_resizes_and_reruns_safely(tmp_path):
    store = ingested(str(tmp_path / "r"), resolution=16, channels=3)
    assert Dataset(store).sample_shape == (3, 16, 16)
    first = store.read_bytes(f"{DATA_DIR}/MANIFEST.json")
    ingest(IngestConfig(shard_size=400, resolution=16, channels=3), store)  # same config: nothing to do
    assert store.read_bytes(f"{DATA_DIR}/MANIFEST.json") == first
    with pytest.raises(ValueError, match="already holds a dataset ingested with a different config"):
        ingest(IngestConfig(shard_size=400, resolution=8), store)
    assert store.read_bytes(f"{DATA_DIR}/MANIFEST.json") == first  # nothing overwritten


def test_interrupted_ingest_is_never_taken_for_a_dataset(tmp_path):
    store = Store(str(tmp_path / "r"))
    store.write_bytes(f"{DATA_DIR}/{shard_name(0)}", b"half a shard from a crashed run")
    with pytest.raises(ValueError, match="no committed dataset"):
        Dataset(store)
    ingest(IngestConfig(shard_size=1000), store)  # replaces the leftovers
    assert Dataset(store).num_samples == 1797 and store.list(f"{DATA_DIR}/shards") == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]


def _png(color, size=(12, 10)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_with_an_unreadable_file(tmp_path):
    root = tmp_path / "images"
    for cls, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.png").write_bytes(_png(color, (12 + i, 10)))
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    store = Store(str(tmp_path / "run"))
    m = ingest(IngestConfig(source=str(root), resolution=8), store)
    assert m["num_samples"] == 6 and m["class_names"] == ["cat", "dog"]
    assert m["skipped"]["count"] == 1 and m["skipped"]["examples"][0].endswith("broken.png")
    shard = Dataset(store).read_shard(0)
    assert shard.arrays.shape == (6, 3, 8, 8)
    assert list(shard.labels) == [0, 0, 0, 1, 1, 1]
    assert shard.arrays[0, 0].mean() > 190 and shard.arrays[3, 2].mean() > 190  # red cats, blue dogs


def test_all_unreadable_fails_and_commits_nothing(tmp_path):
    root = tmp_path / "images" / "only"
    root.mkdir(parents=True)
    (root / "a.png").write_bytes(b"junk")
    store = Store(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="produced no readable samples"):
        ingest(IngestConfig(source=str(tmp_path / "images")), store)
    assert not store.is_committed(DATA_DIR)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "src.parquet"
    images = [{"bytes": _png((i * 20, 0, 0)), "path": f"{i}.png"} for i in range(5)]
    pq.write_table(pa.table({"image": images, "label": [0, 1, 0, 1, 2]}), path)
    m = ingest(IngestConfig(source=str(path), resolution=8), Store(str(tmp_path / "run")))
    assert m["num_samples"] == 5 and m["num_classes"] == 3 and m["sample_shape"] == [3, 8, 8]
    with pytest.raises(ValueError, match="has no image column 'img'"):
        ingest(IngestConfig(source=str(path), image_column="img"), Store(str(tmp_path / "run2")))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"source": "/definitely/missing"}, "does not exist"),
        ({"source": "synthetic:abc"}, "synthetic:<number of samples>"),
        ({"shard_size": 0}, "shard_size must be >= 1"),
        ({"channels": 2}, "channels must be 1"),
        ({"encoder": "jpeg"}, "encoder 'jpeg' is unknown"),
    ],
)
def test_bad_ingest_input(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ingest(IngestConfig(**kw), Store(str(tmp_path / "run")))


def test_ray_cannot_write_into_this_process_memory(tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "a" / "0.png").write_bytes(_png((1, 2, 3)))
    store = Store(f"memory://ddm-tests/{tmp_path.name}")
    with pytest.raises(ValueError, match="Ray workers cannot reach it; use runner=local"):
        ingest(IngestConfig(source=str(tmp_path / "images"), runner="ray"), store)
    assert store.list(DATA_DIR) == []
    m = ingest(IngestConfig(source=str(tmp_path / "images"), shard_size=1), store)  # auto: in this process
    assert m["num_samples"] == 1


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ingest(IngestConfig(source=str(tmp_path / "empty")), Store(str(tmp_path / "run")))


def test_hub_models_fail_clearly_offline(tmp_path):
    """The real loaders (diffusers' AutoencoderKL, transformers' Dinov2Model) with the hub out of
    reach (the tests set HF_HUB_OFFLINE): a message naming the weights and the way out."""
    store = Store(str(tmp_path / "run"))
    with pytest.raises(
        ValueError, match="could not load the VAE weights 'stabilityai/sd-vae-ft-ema'.*encoder=identity"
    ):
        ingest(IngestConfig(encoder="vae"), store)
    assert store.list(DATA_DIR) == []  # it failed before writing anything
    ingest(IngestConfig(), store)
    with pytest.raises(ValueError, match="could not load the DINOv2 weights 'facebook/dinov2-small'.*features=pca"):
        partition(PartitionConfig(features="dinov2"), store)
    assert not store.is_committed(PARTITIONS_DIR) and store.list("features") == []  # nothing written


def _tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tf:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_labels_bad_samples_and_patterns(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    _tar(
        root / "a-00.tar",
        {f"x{i}": {"png": _png((60 * i, 0, 0)), "json": b'{"label": %d, "caption": "c"}' % i} for i in range(3)},
    )
    _tar(
        root / "a-01.tar",
        {
            "y0": {"jpg": b"not a jpeg", "cls": b"1"},  # unreadable: skipped and listed
            "y1": {"webp": _png((0, 90, 0)), "cls": b"2"},  # PIL reads the bytes, whatever the extension says
            "y2": {"png": _png((0, 0, 90)), "txt": b"no label"},  # no label in a labelled dataset: skipped
        },
    )
    m = ingest(IngestConfig(source=str(tmp_path / "wds" / "a-{00..01}.tar"), resolution=8), Store(str(tmp_path / "r")))
    assert (
        m["num_samples"] == 4 and m["class_names"] == ["0", "1", "2"] and m["label_counts"] == {"0": 1, "1": 1, "2": 2}
    )
    assert m["skipped"]["count"] == 2 and m["skipped"]["examples"][0].endswith("a-01.tar:y0")
    assert list(Dataset(Store(str(tmp_path / "r"))).read_shard(0).ids) == [0, 1, 2, 4]  # ids: positions in the source

    plain = tmp_path / "plain"
    plain.mkdir()
    _tar(plain / "p.tar", {f"k{i}": {"png": _png((i, i, i))} for i in range(2)})
    m = ingest(IngestConfig(source=str(plain), resolution=8), Store(str(tmp_path / "r2")))
    assert m["class_names"] == ["unlabeled"] and m["num_samples"] == 2  # no labels anywhere: unconditional

    bad = tmp_path / "bad"
    bad.mkdir()
    _tar(bad / "b.tar", {"k0": {"cls": b"0", "txt": b"caption only"}})
    with pytest.raises(ValueError, match="sample 'k0' has no image file"):
        ingest(IngestConfig(source=str(bad / "b.tar")), Store(str(tmp_path / "r3")))
    (bad / "b.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(ValueError, match="is not a readable tar file"):
        ingest(IngestConfig(source=str(bad / "b.tar")), Store(str(tmp_path / "r4")))


def test_parquet_from_a_dataset_hub_keeps_its_class_names(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["cat", "dog", "eel"]}}
    table = pa.table(
        {"image": [{"bytes": _png((i * 40, 0, 0)), "path": None} for i in range(4)], "label": [0, 1, 0, 1]}
    )
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    (tmp_path / "hub").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "hub" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(2, 2), tmp_path / "hub" / "train-00001-of-00002.parquet")
    m = ingest(IngestConfig(source=str(tmp_path / "hub"), resolution=8, shard_size=3), Store(str(tmp_path / "r")))
    assert m["class_names"] == ["cat", "dog", "eel"] and m["shard_rows"] == [3, 1]  # a shard across two files
    pq.write_table(pa.table({"image": [_png((0, 0, 0))], "label": ["cat"]}), tmp_path / "strings.parquet")
    with pytest.raises(ValueError, match="not integer class ids"):
        ingest(IngestConfig(source=str(tmp_path / "strings.parquet")), Store(str(tmp_path / "r2")))


def test_an_interrupted_ingest_resumes_its_committed_shards(tmp_path, monkeypatch, caplog):
    """A crash after 3 of 5 shards (here: the writer fails at the 4th); the same config resumes
    them, another config starts over. The shards equal an uninterrupted ingest's."""
    import logging

    import ddm.data.ingest as ingest_module

    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(10):
            (root / f"c{c}" / f"{i}.png").write_bytes(_png((25 * i, 100 * c, 7)))
    cfg = IngestConfig(source=str(root), resolution=8, shard_size=4, runner="local")
    whole = Store(str(tmp_path / "whole"))
    ingest(cfg, whole)

    store = Store(str(tmp_path / "run"))
    real = ingest_module.WriteShard.__call__

    def crash_at_fourth(self, part):
        if part["index"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, part)

    monkeypatch.setattr(ingest_module.WriteShard, "__call__", crash_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest(cfg, store)
    monkeypatch.undo()
    assert not store.is_committed(DATA_DIR) and len(store.list(f"{DATA_DIR}/progress")) == 3
    caplog.set_level(logging.INFO, logger="ddm.data")
    m = ingest(cfg, store)
    assert m["resumed_shards"] == 3 and "resuming: 3 of 5 units" in caplog.text
    assert m["files"] == whole.manifest(DATA_DIR)["files"]  # the same shards, byte for byte

    other = Store(str(tmp_path / "other"))
    monkeypatch.setattr(ingest_module.WriteShard, "__call__", crash_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        ingest(cfg, other)
    monkeypatch.undo()
    m = ingest(IngestConfig(source=str(root), resolution=4, shard_size=4, runner="local"), other)
    assert m["resumed_shards"] == 0 and m["sample_shape"] == [3, 4, 4]  # another plan: nothing reused


def test_unreachable_store(s3_endpoint):
    with pytest.raises(StoreError, match="does not exist or is not visible"):
        ingest(IngestConfig(), Store("s3://missing-bucket-xyz/run"))


# --- partition --------------------------------------------------------------------------------


def test_partition_on_each_store(store_url):
    store = ingested(store_url)
    m = partition(PartitionConfig(num_partitions=4, balance_tolerance=0.1), store)
    store.verify(PARTITIONS_DIR)
    a = assignments(store)
    counts = np.bincount(a["partition"], minlength=4)
    assert counts.tolist() == m["counts"] and counts.sum() == 1797 and (counts > 0).all()
    # Balanced: no partition above the cap by more than one fine cluster.
    from safetensors.numpy import load as load_safetensors

    cents = load_safetensors(store.read_verified(PARTITIONS_DIR, CENTROIDS))
    assert cents["coarse"].shape == (4, 32) and cents["fine_counts"].sum() == 1797
    assert counts.max() <= 1.1 * 1797 / 4 + cents["fine_counts"].max()
    # Every sample sits in the coarse cluster of its fine cluster.
    assert np.array_equal(cents["fine_to_coarse"][a["fine"]], a["partition"])
    assert np.array_equal(np.sort(a["id"]), np.arange(1797))


def test_partitions_are_semantic():
    """Digit classes concentrate in partitions far more than under a random split."""
    store = ingested("memory://semantic")
    partition(PartitionConfig(num_partitions=5, balance=False), store)
    a = assignments(store)
    labels = np.concatenate([s.labels for _, s in Dataset(store).iter_shards()])[np.argsort(a["id"])]
    part = a["partition"][np.argsort(a["id"])]

    def purity(p):
        return sum(np.bincount(labels[p == k]).max() for k in np.unique(p)) / len(p)

    random_split = np.random.default_rng(0).integers(0, 5, len(labels))
    assert purity(part) > 2 * purity(random_split), (purity(part), purity(random_split))


def test_random_partitions_are_balanced_seeded_and_not_semantic():
    """The paper's ablation: a random split, exactly balanced, from the seed alone, whose classes
    spread over the partitions as a random split's do (the semantic one concentrates them)."""
    store = ingested("memory://random-split")
    m = partition(PartitionConfig(num_partitions=5, method="random"), store)
    a = assignments(store)
    order = np.argsort(a["id"])
    part = a["partition"][order]
    assert sorted(m["counts"]) == [359, 359, 359, 360, 360] and m["method"] == "random"
    labels = np.concatenate([s.labels for _, s in Dataset(store).iter_shards()])[order]
    purity = sum(np.bincount(labels[part == k]).max() for k in range(5)) / len(part)
    assert purity < 0.2, purity  # ~ 1/10 classes per partition's best class, far from a semantic split
    again = ingested("memory://random-split-2")
    partition(PartitionConfig(num_partitions=5, method="random"), again)
    assert np.array_equal(assignments(again)["partition"][np.argsort(assignments(again)["id"])], part)
    other = ingested("memory://random-split-3")
    partition(PartitionConfig(num_partitions=5, method="random", seed=1), other)
    assert not np.array_equal(assignments(other)["partition"][np.argsort(assignments(other)["id"])], part)
    with pytest.raises(ValueError, match="method must be kmeans or random"):
        PartitionConfig(method="spectral")


def test_partition_is_deterministic():
    a1 = assignments(partition_store("memory://det1"))
    a2 = assignments(partition_store("memory://det2"))
    for name in a1:
        assert np.array_equal(a1[name], a2[name])
    a3 = assignments(partition_store("memory://det3", seed=1))
    assert not np.array_equal(a1["fine"], a3["fine"])


def partition_store(url: str, **kw) -> Store:
    store = ingested(url, source="synthetic:3000", shard_size=256)
    partition(PartitionConfig(num_partitions=3, num_fine=64, **kw), store)
    return store


def test_partition_reruns_and_refuses_to_overwrite():
    store = partition_store("memory://rerun")
    before = store.read_bytes(f"{PARTITIONS_DIR}/MANIFEST.json")
    partition(PartitionConfig(num_partitions=3, num_fine=64), store)
    assert store.read_bytes(f"{PARTITIONS_DIR}/MANIFEST.json") == before
    with pytest.raises(ValueError, match="not overwritten"):
        partition(PartitionConfig(num_partitions=4, num_fine=64), store)
    assert store.read_bytes(f"{PARTITIONS_DIR}/MANIFEST.json") == before


def test_bad_partition_input(tmp_path):
    with pytest.raises(ValueError, match="num_partitions must be >= 1"):
        PartitionConfig(num_partitions=0)
    store = ingested(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="num_partitions=5000 exceeds the 1797 samples"):
        partition(PartitionConfig(num_partitions=5000), store)
    with pytest.raises(ValueError, match="no committed dataset .* `ddm ingest"):
        partition(PartitionConfig(), Store(str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="features 'sift' is unknown"):
        partition(PartitionConfig(features="sift"), store)


# --- reader -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parted():
    return partition_store("memory://reader")


def test_ranks_split_a_partition_without_overlap(parted):
    a = assignments(parted)
    members = set(a["id"][a["partition"] == 1].tolist())
    readers = [PartitionReader(parted, 1, batch_size=16, rank=r, world_size=3, seed=5) for r in range(3)]
    seen = [set() for _ in readers]
    for r, reader in enumerate(readers):
        for _ in range(reader.batches_per_epoch):
            b = reader.next_batch()
            assert (b["partition"] == 1).all()
            seen[r].update(b["id"].tolist())
    assert all(not (seen[i] & seen[j]) for i in range(3) for j in range(i + 1, 3))
    covered = set().union(*seen)
    assert covered <= members and len(covered) >= len(members) - 3 * (16 + 1)  # only the tails are dropped


def test_epochs_reshuffle_and_batches_are_well_formed(parted):
    reader = PartitionReader(parted, 0, batch_size=32, seed=1)
    first = [reader.next_batch()["id"] for _ in range(reader.batches_per_epoch)]
    second = reader.next_batch()["id"]
    assert reader.epoch == 1 and not np.array_equal(first[0].numpy(), second.numpy())
    b = reader.next_batch()
    assert b["x"].shape == (32, 1, 16, 16) and b["x"].dtype.is_floating_point
    assert -1.0 <= float(b["x"].min()) and float(b["x"].max()) <= 1.0


def test_resume_replays_exactly_the_same_batches(parted):
    straight = PartitionReader(parted, 2, batch_size=24, seed=3)
    ids = [straight.next_batch()["id"] for _ in range(3 * straight.batches_per_epoch)]
    interrupted = PartitionReader(parted, 2, batch_size=24, seed=3)
    k = straight.batches_per_epoch + 2  # stop mid-way through the second epoch
    for _ in range(k):
        interrupted.next_batch()
    state = interrupted.state_dict()
    resumed = PartitionReader(parted, 2, batch_size=24, seed=3)
    resumed.load_state_dict(state)
    for expected in ids[k:]:
        assert np.array_equal(resumed.next_batch()["id"].numpy(), expected.numpy())


def test_reader_errors(parted):
    with pytest.raises(ValueError, match=r"partition 7 does not exist: the store has partitions 0..2"):
        PartitionReader(parted, 7, batch_size=8)
    with pytest.raises(ValueError, match="too few for batch_size"):
        PartitionReader(parted, 0, batch_size=100_000)
    reader = PartitionReader(parted, 0, batch_size=8)
    state = reader.state_dict() | {"world_size": 2}
    with pytest.raises(ValueError, match="saved with world_size=2"):
        reader.load_state_dict(state)


def test_reader_over_all_data_for_the_router(parted):
    reader = PartitionReader(parted, None, batch_size=64)
    assert reader.num_samples == 3000
    parts = reader.next_batch()["partition"]
    assert len(set(parts.tolist())) == 3  # every partition shows up in a shuffled batch of all data


def test_image_modes_are_converted_not_clipped(tmp_path):
    """16-bit grayscale, palette, CMYK, alpha and EXIF-rotated images, ingested from a folder, against
    conversions computed independently (numpy, or PIL's own decoding of the same file)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images" / "all"
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:16, 0:16]
    expected = {}

    gray16 = (yy * 16 + xx).astype(np.uint16) * 257  # 0 .. 65535: 8-bit values 0 .. 255
    Image.fromarray(gray16).save(root / "a_gray16.png")
    expected["a_gray16.png"] = np.repeat((yy * 16 + xx).astype(np.uint8)[None], 3, axis=0)

    rgb = np.stack([yy * 15, xx * 15, (yy + xx) * 7], axis=-1).astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(root / "b_palette.png")
    expected["b_palette.png"] = np.asarray(palette.convert("RGB")).transpose(2, 0, 1)

    Image.fromarray(rgb).convert("CMYK").save(root / "c_cmyk.jpg", quality=95)
    expected["c_cmyk.jpg"] = np.asarray(Image.open(root / "c_cmyk.jpg").convert("RGB")).transpose(2, 0, 1)

    alpha = (xx * 17).astype(np.uint8)  # transparent on the left, opaque on the right
    Image.fromarray(np.dstack([rgb, alpha])).save(root / "d_alpha.png")
    a = alpha[..., None] / 255.0
    expected["d_alpha.png"] = np.round(rgb * a + 255 * (1 - a)).astype(np.uint8).transpose(2, 0, 1)  # over white

    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: stored upside down
    Image.fromarray(rgb).save(root / "e_rotated.jpg", quality=95, exif=exif)
    decoded = np.asarray(Image.open(root / "e_rotated.jpg").convert("RGB"))
    expected["e_rotated.jpg"] = decoded[::-1, ::-1].transpose(2, 0, 1)  # shown upright

    store = Store(str(tmp_path / "run"))
    m = ingest(IngestConfig(source=str(tmp_path / "images"), channels=3), store)
    assert m["num_samples"] == 5 and m["skipped"]["count"] == 0
    arrays = Dataset(store).read_shard(0).arrays
    for got, (name, want) in zip(arrays, sorted(expected.items())):
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 1, (name, diff)  # rounding of the alpha blend; every other case is exact
    assert arrays[0].mean() == pytest.approx(127.5, abs=0.5)  # 16-bit: the middle grey, not 255


def test_glyphs_are_a_deterministic_font_dataset(tmp_path):
    """glyphs:N renders characters from the fonts matplotlib ships: 62 classes at 16x16, the same
    images for the same seed, every sample a new image, and the manifest names each font face."""
    from ddm.data.glyphs import find_fonts, matplotlib_fonts

    store = Store(str(tmp_path / "g"))
    m = ingest(IngestConfig(source="glyphs:600", shard_size=256), store)
    assert m["num_samples"] == 600 and m["sample_shape"] == [1, 16, 16] and m["num_classes"] == 62
    assert m["class_names"][:3] == ["0", "1", "2"] and len(m["label_counts"]) > 50
    faces = m["source_info"]["fonts"]
    assert len(faces) >= 10 and all(len(f["sha256"]) == 64 for f in faces)
    assert {"DejaVuSans.ttf", "cmr10.ttf", "STIXGeneral.ttf"} <= {f["file"] for f in faces}
    assert not any(f["file"].startswith(("cmsy", "cmex", "STIXSiz")) for f in faces)  # symbol faces are left out
    ds = Dataset(store)
    x = np.concatenate([ds.read_shard(i).arrays for i in range(ds.num_shards)])
    assert x.dtype == np.uint8 and x.max() == 255 and (x == 0).mean() > 0.3  # white glyphs on black
    assert len({row.tobytes() for row in x}) == 600  # no image repeats
    again = ingest(IngestConfig(source="glyphs:600", shard_size=256), Store(str(tmp_path / "g2")))
    y = np.concatenate([Dataset(Store(str(tmp_path / "g2"))).read_shard(i).arrays for i in range(3)])
    assert again["label_counts"] == m["label_counts"] and np.array_equal(x, y)
    other = ingest(IngestConfig(source="glyphs:600", shard_size=256, seed=1), Store(str(tmp_path / "g3")))
    assert other["label_counts"] != m["label_counts"]
    # A font folder that covers only some characters contributes only the faces that cover them all.
    assert find_fonts([matplotlib_fonts()], "AB") == find_fonts([], "AB")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"source": "glyphs:ten"}, "expected glyphs:<number of samples>"),
        ({"source": "glyphs:0"}, "glyphs source needs N >= 1"),
        ({"source": "glyphs:10", "fonts": ["/no/such/fonts"]}, "font location '/no/such/fonts' does not exist"),
        ({"source": "glyphs:10", "charset": "\u0b95\u0b99"}, "no font .* has glyphs for every character"),
        ({"source": "glyphs:10", "charset": "abca"}, "repeats a character"),
    ],
)
def test_glyph_source_bad_input(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ingest(IngestConfig(**kw), Store(str(tmp_path / "s")))
    assert not (tmp_path / "s" / "data").exists() or not Store(str(tmp_path / "s")).is_committed("data")


def test_shard_cache_is_bounded_in_bytes_and_reads_a_fitting_dataset_once(parted):
    """3000 samples in 12 shards: with room for all of them each shard is read (and verified) once
    over three epochs of random batches; with room for two the cache never holds more than two."""
    reads = []
    shard_bytes = 256 * int(np.prod(Dataset(parted).sample_shape))  # uint8 pixels
    for budget, most in ((2 << 30, 12), (2 * shard_bytes, 2)):
        reader = PartitionReader(parted, None, batch_size=64, seed=1, cache_bytes=budget)
        original, count = reader.dataset.read_shard, [0]

        def counting(i, *more, original=original, count=count):
            count[0] += 1
            return original(i, *more)

        reader.dataset.read_shard = counting
        for _ in range(3 * reader.batches_per_epoch):
            reader.next_batch()
            assert len(reader._cache) <= most
        reads.append(count[0])
    assert reads[0] == 12 and reads[1] > 100
