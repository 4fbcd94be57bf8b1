"""What ``ddm ingest`` reads: sources, cut into units of work (one per output shard).

Two kinds of source:

- **Files** (image folders, Parquet with image bytes, WebDataset tar shards; each from any fsspec
  URL; ``ddm.data.sources.files``, ``.webdataset``). The driver only lists them (``units``: which
  files, rows or tar samples make each output shard); ``load_unit`` reads, decodes, converts and
  resizes one unit anywhere (a Ray task on any node, or this process). Unreadable samples are
  skipped and listed; a sample's id is its position in the source, so ids and shards do not depend
  on which worker ran what.
- **Generated** (digits, glyphs:N, synthetic:N; ``ddm.data.sources.generated``): made in order by
  one process from one random stream (``generate``), cut into the same units.

Either way a unit becomes ``{"index", "ids", "arrays" (N, C, H, W) uint8, "labels", "skipped"}``, and
``"captions"`` (N strings) where the ingest reads captions (``caption``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import fsspec
import numpy as np

from ddm.data.config import IngestConfig
from ddm.data.sources.base import Source, clean_caption, load_items
from ddm.data.sources.files import FolderSource, ParquetSource, data_file
from ddm.data.sources.generated import DigitsSource, GlyphSource, SyntheticSource
from ddm.data.sources.images import IMAGE_EXTENSIONS, UNREADABLE, decode, to_8bit
from ddm.data.sources.webdataset import WDS_IMAGE, WebDatasetSource, expand_braces
from ddm.store import absolute_url
from ddm.store.urls import check_store_url

__all__ = [
    "IMAGE_EXTENSIONS",
    "UNREADABLE",
    "WDS_IMAGE",
    "DigitsSource",
    "FolderSource",
    "GlyphSource",
    "ParquetSource",
    "Source",
    "SyntheticSource",
    "WebDatasetSource",
    "decode",
    "expand_braces",
    "captions_and_labels",
    "first_captions",
    "held_out_prompts",
    "generated_units",
    "load_unit",
    "open_source",
    "to_8bit",
]

# A unit's kind -> the source that reads it.
READERS: dict[str, type[Source]] = {cls.kind: cls for cls in (FolderSource, ParquetSource, WebDatasetSource)}


def load_unit(unit: dict, resolution: int, channels: int) -> dict:
    """Read, decode, convert and resize one unit's items (an unreadable or unlabeled one is
    skipped and listed); every sample of a unit must come out with the same shape."""
    if unit["kind"] not in READERS:
        raise ValueError(f"unknown unit kind {unit['kind']!r}")
    return load_items(unit, READERS[unit["kind"]].items(unit), resolution, channels)


def generated_units(source: Source, units: list[dict]) -> Iterator[dict]:
    """A generated source's samples, in order, cut into ``units`` (ids are positions); a source
    with captions yields (label, array, caption)."""
    it = iter(source.generate())
    for unit in units:
        got = [next(it) for _ in range(unit["stop"] - unit["start"])]
        part = {
            "index": unit["index"],
            "ids": np.arange(unit["start"], unit["stop"], dtype=np.int64),
            "arrays": np.stack([g[1] for g in got]),
            "labels": np.asarray([g[0] for g in got], dtype=np.int32),
            "skipped": [],
        }
        if source.caption:
            part["captions"] = [g[2] for g in got]
        yield part


def open_source(cfg: IngestConfig) -> Source:
    src = cfg.source
    if src == "digits":
        return DigitsSource(cfg)
    for kind, cls in (("synthetic", SyntheticSource), ("glyphs", GlyphSource)):
        if src.startswith(f"{kind}:"):
            try:
                n = int(src.split(":", 1)[1])
            except ValueError as e:
                raise ValueError(f"source {src!r}: expected {kind}:<number of samples>") from e
            return cls(cfg, n)
    check_store_url(src, "source URL")  # s3:/bucket/x (one slash) is refused, not read as a local path
    if src.endswith(".tar") or ("{" in src and ".tar" in src):
        return WebDatasetSource(cfg, src)
    if src.endswith(".parquet"):
        return ParquetSource(cfg, src)
    fs, path = fsspec.core.url_to_fs(src)
    if not fs.exists(path):
        raise ValueError(
            f"source {src!r} does not exist; use digits, glyphs:N, synthetic:N, an image folder, Parquet or "
            "WebDataset tar shards"
        )
    if fs.isdir(path):
        names = fs.find(path, maxdepth=2)
        if any(data_file(n, ".tar") for n in names):
            return WebDatasetSource(cfg, src)
        if any(data_file(n, ".parquet") for n in names):
            return ParquetSource(cfg, src)
        return FolderSource(cfg, src)
    raise ValueError(f"source {src!r} is a file that is not .parquet or .tar; point at the folder or shards")


def first_captions(cfg: IngestConfig, n: int) -> list[str]:
    """The first ``n`` captions of the source ``cfg`` names, as ingest stores them (cleaned; an
    unlabeled item's too), without decoding an image."""
    return [caption for caption, _ in _captioned(open_source(cfg), cfg, n, labeled=False)]


def captions_and_labels(cfg: IngestConfig, n: int) -> tuple[list[str], list[int], list[str]]:
    """The captions and labels of the first ``n`` labeled items of the source ``cfg`` names (held-out
    prompts), and its class names (what the labels mean)."""
    source = open_source(cfg)
    pairs = _captioned(source, cfg, n, labeled=True)
    return [c for c, _ in pairs], [int(y) for _, y in pairs], list(source.class_names)


def _captioned(source: Source, cfg: IngestConfig, n: int, labeled: bool) -> list[tuple[str, int | None]]:
    if not source.caption:
        raise ValueError(f"source {cfg.source!r} gives no captions: set caption=... (e.g. describe for glyphs)")
    if source.generated:
        return [(g[2], g[0]) for g in itertools.islice(source.generate(), n)]
    items = (item for unit in source.units(cfg.shard_size) for item in source.items(unit))
    if labeled:
        items = (item for item in items if item[1] is not None)
    return [(clean_caption(item[4]), item[1]) for item in itertools.islice(items, n)]


def held_out_prompts(manifest: dict, source: str, seed: int, n: int) -> tuple[list[str], list[int]]:
    """``n`` prompts from a held-out ``source`` (its items in order, cycled) and the class of each
    one's image, read with the ingest settings of the dataset whose ``manifest`` is given (a generated
    source drawn with ``seed``); the training data itself, or other classes, are refused."""
    made = manifest["ingest"]
    names = {f.name for f in dataclasses.fields(IngestConfig)}
    cfg = IngestConfig(**{
        **{k: v for k, v in made.items() if k in names}, "source": source, "seed": seed, "text_encoder": "",
        "runner": "local",
    })  # fmt: skip
    if source.split(":")[0] in ("glyphs", "synthetic", "digits"):
        if source == "digits" or seed == made.get("seed"):
            raise ValueError(
                f"held_out={source} with held_out_seed={seed} draws the training data's own images (the dataset is "
                f"{made['source']}, seed {made.get('seed')}): choose another held_out_seed"
            )
    elif _url(source) == _url(made["source"]):
        raise ValueError(
            f"held_out={source} is the dataset's own source: give files no model trained on (e.g. a held-back split)"
        )
    captions, labels, classes = captions_and_labels(cfg, n)
    if not captions:
        raise ValueError(f"held_out={source!r} has no labeled, captioned items")
    if classes != manifest["class_names"]:
        raise ValueError(
            f"held_out={source!r} has the classes {classes[:8]}... but the dataset {manifest['class_names'][:8]}...: "
            "held-out prompts need the dataset's classes (the same names, in the same order)"
        )
    order = [i % len(captions) for i in range(n)]
    return [captions[i] for i in order], [labels[i] for i in order]


def _url(source: str) -> str:
    return absolute_url(source.removeprefix("file://")).rstrip("/")
