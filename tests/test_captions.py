"""Captions through the data stage: every source kind reads them into the shards' ``caption``
column (folder sidecars, Parquet columns, WebDataset members, what the glyph renderer drew), empty
ones are counted, and the reader hands each sample's caption out beside its image. The Ray Data
path (two nodes, S3) is checked in ``test_data_pipeline.py`` on a captioned WebDataset."""

import json

import numpy as np
import pytest
import torch

from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.data.reader import PartitionReader
from ddm.data.shards import Dataset
from ddm.store import Store
from tests.test_data import _png, _tar


def captions_of(store: Store) -> list[str]:
    ds = Dataset(store)
    return [c for i in range(ds.num_shards) for c in ds.read_shard(i).captions]


def test_image_folder_sidecars_with_classes_and_without(tmp_path):
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.png").write_bytes(_png((40 * i, 0, 0)))
            if (cls, i) != ("dog", 1):  # one image without a sidecar
                (root / cls / f"{i}.txt").write_text(f" a {cls}, number {i}\n")
    store = Store(str(tmp_path / "r"))
    m = ingest(IngestConfig(source=str(root), resolution=8, caption="txt"), store)
    assert captions_of(store) == ["a cat, number 0", "a cat, number 1", "a dog, number 0", ""]
    assert m["captions"]["empty"] == 1 and m["captions"]["count"] == 4 and m["captions"]["source"] == "txt"
    assert m["class_names"] == ["cat", "dog"]

    # A flat folder (a typical captioned dataset) is one unlabeled class; json:<key> reads sidecar JSON.
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"img{i}.png").write_bytes(_png((0, 50 * i, 0)))
        (flat / f"img{i}.json").write_text(json.dumps({"caption": f"green {i}", "other": 1}))
    store = Store(str(tmp_path / "r2"))
    m = ingest(IngestConfig(source=str(flat), resolution=8, caption="json:caption"), store)
    assert m["class_names"] == ["unlabeled"] and captions_of(store) == ["green 0", "green 1", "green 2"]
    # Without captions asked for, sidecars are ignored and the shards have no caption column.
    plain = Store(str(tmp_path / "r3"))
    m = ingest(IngestConfig(source=str(flat), resolution=8), plain)
    assert m["captions"] is None and Dataset(plain).read_shard(0).captions is None


def test_parquet_caption_column_unlabeled_and_clear_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "laion.parquet"
    images = [{"bytes": _png((i * 20, 0, 0)), "path": None} for i in range(4)]
    pq.write_table(pa.table({"image": images, "TEXT": ["a red square", None, "  ", "dark\n"], "w": [1] * 4}), path)
    store = Store(str(tmp_path / "r"))
    m = ingest(IngestConfig(source=str(path), resolution=8, label_column="", caption="auto"), store)
    assert captions_of(store) == ["a red square", "", "", "dark"]  # null and blank captions are empty
    assert m["captions"]["source"] == "TEXT" and m["captions"]["empty"] == 2  # auto found TEXT
    assert m["class_names"] == ["unlabeled"] and m["label_counts"] == {"0": 4}
    with pytest.raises(ValueError, match=r"has no caption column 'caption'; its columns are \['image', 'TEXT', 'w'\]"):
        ingest(IngestConfig(source=str(path), label_column="", caption="caption"), Store(str(tmp_path / "r2")))
    with pytest.raises(ValueError, match=r"has no label column 'label'.*set label_column=<column>"):
        ingest(IngestConfig(source=str(path), caption="TEXT"), Store(str(tmp_path / "r3")))
    pq.write_table(pa.table({"image": images, "label": [0] * 4}), tmp_path / "nocap.parquet")
    with pytest.raises(ValueError, match="none of the caption columns caption=auto looks for"):
        ingest(IngestConfig(source=str(tmp_path / "nocap.parquet"), caption="auto"), Store(str(tmp_path / "r4")))
    assert not Store(str(tmp_path / "r4")).exists("data/MANIFEST.json")  # nothing written
    # The same store, another caption setting: refused as another dataset, the first one kept.
    with pytest.raises(ValueError, match="already holds a dataset ingested with a different config"):
        ingest(IngestConfig(source=str(path), resolution=8, label_column="", caption="w"), store)
    assert captions_of(store)[0] == "a red square"


def test_webdataset_text_and_json_members(tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    _tar(
        root / "s.tar",
        {
            "a": {"png": _png((10, 0, 0)), "cls": b"0", "txt": b"first", "json": b'{"prompt": "p-a"}'},
            "b": {"png": _png((20, 0, 0)), "cls": b"1", "json": b'{"prompt": "p-b"}'},  # no .txt
            "c": {"png": _png((30, 0, 0)), "cls": b"1", "txt": "caf\u00e9".encode(), "json": b"[1, 2]"},
        },
    )
    store = Store(str(tmp_path / "t"))
    m = ingest(IngestConfig(source=str(root), resolution=8, caption="auto"), store)
    assert captions_of(store) == ["first", "", "caf\u00e9"] and m["captions"]["empty"] == 1
    store = Store(str(tmp_path / "j"))
    ingest(IngestConfig(source=str(root), resolution=8, caption="json:prompt"), store)
    assert captions_of(store) == ["p-a", "p-b", ""]  # a json that is not an object has no caption


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"source": "digits", "caption": "auto"}, "source 'digits' .* has no captions"),
        ({"source": "synthetic:10", "caption": "txt"}, "source 'synthetic:10' .* has no captions"),
        ({"source": "glyphs:10", "caption": "txt"}, "glyph captions are made from what was drawn"),
        ({"source": "glyphs:10", "caption": "json:"}, "names no key"),
    ],
)
def test_sources_without_captions_refuse_them(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        ingest(IngestConfig(**kw), Store(str(tmp_path / "s")))
    assert not Store(str(tmp_path / "s")).exists("data/MANIFEST.json")


def test_bad_member_caption_names_the_forms(tmp_path):
    (tmp_path / "f" / "a").mkdir(parents=True)
    (tmp_path / "f" / "a" / "0.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(ValueError, match=r"use txt .* json:<key>"):
        ingest(IngestConfig(source=str(tmp_path / "f"), caption="Text File"), Store(str(tmp_path / "s")))


def test_glyph_captions_say_what_was_drawn(tmp_path):
    """Captions change no image; each names its sample's character; the lean and size words agree
    with the pixels (a lean measured on the image, a size measured as the glyph's extent)."""
    from ddm.data import glyphs

    store = Store(str(tmp_path / "c"))
    m = ingest(IngestConfig(source="glyphs:300", shard_size=128, caption="describe"), store)
    plain = Store(str(tmp_path / "p"))
    ingest(IngestConfig(source="glyphs:300", shard_size=128), plain)
    ds, dp = Dataset(store), Dataset(plain)
    for i in range(ds.num_shards):
        assert np.array_equal(ds.read_shard(i).arrays, dp.read_shard(i).arrays)
    assert m["captions"]["empty"] == 0
    shards = [ds.read_shard(i) for i in range(ds.num_shards)]
    labels = np.concatenate([s.labels for s in shards])
    caps = [c for s in shards for c in s.captions]
    assert all(c.startswith(glyphs.char_name(m["class_names"][y]) + " in ") for c, y in zip(caps, labels))
    assert len(set(caps)) > 250  # nearly every caption is its own
    assert any("dejavu sans mono" in c for c in caps) and any("computer modern" in c for c in caps)

    # The words against the pixels: an "l" drawn leaning right has its top to the right of its bottom.
    font = next(f for f in glyphs.find_fonts([], "l") if f.endswith("DejaVuSans.ttf"))

    def top_minus_bottom(img: np.ndarray) -> float:
        ys, xs = np.nonzero(img > 128)
        mid = np.median(ys)
        return xs[ys < mid].mean() - xs[ys > mid].mean()

    for word, sign in (("leaning right", 1), ("leaning left", -1)):
        for seed in range(200):
            img, drawn = glyphs.render_drawn(font, "l", 32, np.random.default_rng(seed))
            if word in glyphs.describe(font, "l", drawn) and abs(glyphs.lean(drawn["angle"], drawn["shear"])) > 10:
                assert sign * top_minus_bottom(img) > 1, (word, drawn)
                break
        else:
            pytest.fail(f"no seed drew an l {word} by more than 10 degrees")
    heights = {"small": [], "large": []}
    for seed in range(60):
        img, drawn = glyphs.render_drawn(font, "H", 32, np.random.default_rng(seed))
        size = glyphs.describe(font, "H", drawn).split(", ")[1]
        if size in heights and abs(glyphs.lean(drawn["angle"], drawn["shear"])) < 4:
            ys = np.nonzero(img.max(axis=1) > 128)[0]
            heights[size].append(ys.max() - ys.min())
    assert heights["small"] and heights["large"] and max(heights["small"]) < min(heights["large"])


def test_the_reader_hands_out_each_samples_caption(tmp_path):
    store = Store(str(tmp_path / "r"))
    ingest(IngestConfig(source="glyphs:256", shard_size=100, caption="describe"), store)
    partition(PartitionConfig(num_partitions=2, num_fine=16), store)
    ds = Dataset(store)
    by_id = {int(i): c for s in (ds.read_shard(k) for k in range(ds.num_shards)) for i, c in zip(s.ids, s.captions)}
    reader = PartitionReader(store, partition=None, batch_size=32, seed=3)
    for _ in range(3):
        batch = reader.next_batch()
        assert batch["caption"] == [by_id[int(i)] for i in batch["id"]]
    uncaptioned = Store(str(tmp_path / "u"))
    ingest(IngestConfig(source="glyphs:256", shard_size=100), uncaptioned)
    partition(PartitionConfig(num_partitions=2, num_fine=16), uncaptioned)
    assert "caption" not in PartitionReader(uncaptioned, partition=0, batch_size=8).next_batch()


@pytest.mark.parametrize("kind", ["fixed", "binary", "large_binary"])
def test_stored_embeddings_round_trip_in_every_binary_layout(kind):
    """Embeddings are written as fixed-size binary rows (no 32-bit offsets: a shard of T5-XL float32
    rows, 1 MB each, passes 2 GiB at 2200 samples); shards of ddm 0.2 (binary) and large_binary read
    back the same arrays."""
    import pyarrow as pa

    from ddm.data.shards import decode_shard, encode_shard, read_parquet_bytes, write_parquet_bytes

    rng = np.random.default_rng(0)
    text = {
        "text_tokens": rng.standard_normal((3, 4, 5)).astype(np.float16),
        "text_lengths": np.array([4, 2, 1], np.int16),
        "text_pooled": rng.standard_normal((3, 5)).astype(np.float16),
    }
    raw = encode_shard(np.arange(3), np.zeros((3, 1, 2, 2), np.uint8), np.zeros(3, np.int32), ["a", "b", ""], text)
    table = read_parquet_bytes(raw)
    assert pa.types.is_fixed_size_binary(table.schema.field("text_tokens").type)
    if kind != "fixed":  # the same rows, as variable-size binary
        wide = pa.large_binary() if kind == "large_binary" else pa.binary()
        for name in text:
            i = table.schema.get_field_index(name)
            rows = pa.array([bytes(v.as_py()) for v in table.column(name)], type=wide)
            table = table.set_column(i, pa.field(name, wide), rows)
        raw = write_parquet_bytes(table)
    shard = decode_shard(raw, (1, 2, 2), "uint8", {"dim": 5, "length": 4, "dtype": "float16"})
    for name, values in text.items():
        assert np.array_equal(shard.text[name], values), name
    assert shard.captions == ["a", "b", ""]


def test_readers_that_do_not_use_stored_embeddings_leave_them_in_the_shards(tmp_path):
    """An evaluation or a job that encodes its captions reads the images, labels and captions only."""
    from ddm.models.text_encoder import make_tiny

    store = Store(str(tmp_path / "store"))
    src = dict(source="glyphs:64", shard_size=32, caption="describe")
    encoder = make_tiny(str(tmp_path / "enc"), [f"word{i}" for i in range(8)], hidden_size=8, layers=1, heads=2,
                        max_length=6)  # fmt: skip
    ingest(IngestConfig(**src, text_encoder=encoder), store)
    partition(PartitionConfig(num_partitions=2, num_fine=8), store)
    full = PartitionReader(store, None, batch_size=16).next_batch()
    bare = PartitionReader(store, None, batch_size=16, embeddings=False).next_batch()
    assert full["text_tokens"].shape == (16, 6, 8) and not any(k.startswith("text_") for k in bare)
    assert set(bare) == set(full) - {"text_tokens", "text_mask", "text_pooled"}
    assert (
        all(torch.equal(bare[k], full[k]) for k in ("x", "y", "id", "partition")) and bare["caption"] == full["caption"]
    )
    assert Dataset(store).read_shard(0).text is None and Dataset(store).read_shard(0, embeddings=True).text


def test_the_vae_and_the_caption_encoder_share_the_gpus_instead_of_each_asking_for_all():
    """An actor pool waits for all its actors: on 4 GPUs, two network stages (VAE, caption encoder)
    of 4 actors each hold half a GPU per actor (4 GPUs in all), not 4 GPUs each."""
    from ddm.data.pipeline import model_stage

    def stage(pools, gpus=4.0, actors=0, per_gpu=1):
        return model_stage("m", lambda: None, "ray", actors, per_gpu, pools, gpus)

    one, two = stage(1), stage(2)
    assert (one.actors, one.num_gpus) == (4, 1.0) and (two.actors, two.num_gpus) == (4, 0.5)
    assert 2 * two.actors * two.num_gpus == 4.0  # both pools fit on the cluster's 4 GPUs
    assert stage(2, per_gpu=2).actors * stage(2, per_gpu=2).num_gpus * 2 == 4.0
    assert (stage(2, gpus=0.0).actors, stage(2, gpus=0.0).num_gpus) == (1, 0.0)  # CPU: one actor each
