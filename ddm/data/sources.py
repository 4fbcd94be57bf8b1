"""What ``ddm ingest`` reads: sources, cut into units of work (one per output shard).

Two kinds of source:

- **Files** (image folders, Parquet with image bytes, WebDataset tar shards; each from any fsspec
  URL). The driver only lists them (``units``: which files, rows or tar samples make each output
  shard); ``load_unit`` reads, decodes, converts and resizes one unit anywhere (a Ray task on any
  node, or this process). Unreadable samples are skipped and listed; a sample's id is its position
  in the source, so ids and shards do not depend on which worker ran what.
- **Generated** (digits, glyphs:N, synthetic:N): made in order by one process from one random
  stream (``generate``), cut into the same units.

Either way a unit becomes ``{"index", "ids", "arrays" (N, C, H, W) uint8, "labels", "skipped"}``.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from ddm.data.pipeline import even_units

if TYPE_CHECKING:  # the config belongs to the ingest stage, which imports this module
    from ddm.data.ingest import IngestConfig

log = logging.getLogger("ddm.ingest")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# What a decoder may raise on a bad image (truncated, not an image, too large, bad mode).
UNREADABLE = (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError, Image.DecompressionBombError)


class Source(abc.ABC):
    """Knows its class names and how many items it has; cuts them into units of work."""

    class_names: list[str]
    info: dict = {}
    generated = False  # True: made in order by this process (``generate``), not loaded per unit

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def units(self, shard_size: int) -> list[dict]:
        """One dict per output shard: its index, its first item's position and what to load."""
        return [
            {"index": i, "start": a, "stop": b, **self._unit(a, b)}
            for i, (a, b) in enumerate(even_units(len(self), shard_size))
        ]

    def _unit(self, start: int, stop: int) -> dict:
        return {}

    def validate(self, cfg: IngestConfig) -> None:
        """Decode the first few items (before any cluster work) so a wrong source fails at once.
        Generated sources have nothing to check; they have ``generate()`` instead of units to load."""


def to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL image as 8-bit grayscale (``channels=1``) or RGB, its pixel values scaled, never clipped.

    Applied in order: the EXIF orientation (a phone photo stored sideways comes out upright); 16-bit
    and 32-bit integer grayscale scaled to 8 bits (v / 257: PIL's own ``convert`` clips them at 255,
    which saturates a 16-bit PNG); transparency composited over white (PIL's ``convert`` would keep
    whatever colour the transparent pixels happen to hold); palette and CMYK through PIL's
    conversions.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max() > 255:  # "I" holding 8-bit values stays as it is
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def _to_chw(img, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> 8-bit (``to_8bit``), center-cropped, resized uint8 (C, H, W)."""
    img = to_8bit(img, channels)
    if resolution:
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != resolution:
            img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class DigitsSource(Source):
    """scikit-learn's 8x8 digits: real handwriting that ships with the package (no network)."""

    generated = True

    def __init__(self, cfg: IngestConfig):
        from sklearn.datasets import load_digits  # scikit-learn takes 1.5 s to import: only where used

        digits = load_digits()
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.labels)

    def generate(self):
        res, ch = self.cfg.resolution, self.cfg.channels or 1
        for img, label in zip(self.images, self.labels):
            if (res in (0, 8)) and ch == 1:
                yield int(label), img[None]
            else:
                yield int(label), _to_chw(Image.fromarray(img), res or 8, ch)


class SyntheticSource(Source):
    """N small images of class-dependent Gaussian blobs plus noise, generated deterministically."""

    generated = True

    def __init__(self, cfg: IngestConfig, n: int, num_classes: int = 10):
        if n < 1:
            raise ValueError(f"synthetic source needs N >= 1, got {n}")
        self.n, self.cfg, self.num_classes = n, cfg, num_classes
        self.class_names = [f"blob{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def generate(self):
        res, ch = self.cfg.resolution or 16, self.cfg.channels or 1
        rng = np.random.default_rng(self.cfg.seed)
        yy, xx = np.mgrid[0:res, 0:res] / res
        centers = np.random.default_rng(1234).uniform(0.2, 0.8, size=(self.num_classes, 2))
        chunk = 1024
        for start in range(0, self.n, chunk):
            m = min(chunk, self.n - start)
            labels = rng.integers(0, self.num_classes, m)
            jitter = rng.normal(0, 0.05, size=(m, 2))
            c = centers[labels] + jitter
            d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
            img = np.exp(-d2 / 0.02) + rng.normal(0, 0.05, size=(m, res, res))
            img = np.clip(img * 255, 0, 255).astype(np.uint8)
            for i in range(m):
                yield int(labels[i]), np.repeat(img[i][None], ch, axis=0)


class GlyphSource(Source):
    """``glyphs:N``: N characters rendered from fonts with random size, position, rotation, shear and
    weight (``ddm.data.glyphs``); classes are the characters of ``charset``; deterministic in ``seed``."""

    generated = True

    def __init__(self, cfg: IngestConfig, n: int):
        from ddm.data import glyphs

        if n < 1:
            raise ValueError(f"glyphs source needs N >= 1, got {n}")
        self.charset = cfg.charset or glyphs.DEFAULT_CHARSET
        if len(set(self.charset)) != len(self.charset):
            raise ValueError(f"ingest.charset {self.charset!r} repeats a character; each character is one class")
        self.font_digests = glyphs.find_fonts(list(cfg.fonts), self.charset)
        self.fonts = list(self.font_digests)
        self.n, self.cfg = n, cfg
        self.class_names = list(self.charset)
        log.info("glyphs: %d samples of %d characters from %d font faces", n, len(self.charset), len(self.fonts))

    @property
    def info(self) -> dict:
        """What the dataset was made from (the manifest keeps it): each face's file name and sha256."""
        return {"fonts": [{"file": os.path.basename(f), "sha256": d} for f, d in self.font_digests.items()]}

    def __len__(self) -> int:
        return self.n

    def generate(self):
        from ddm.data.glyphs import render

        res, ch = self.cfg.resolution or 16, self.cfg.channels or 1
        rng = np.random.default_rng(self.cfg.seed)
        for _ in range(self.n):
            label = int(rng.integers(len(self.charset)))
            img = render(self.fonts[int(rng.integers(len(self.fonts)))], self.charset[label], res, rng)
            yield label, np.repeat(img[None], ch, axis=0)


# --- files: folders, Parquet, WebDataset ---------------------------------------------------------


def decode(raw: bytes, resolution: int, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 (C, H, W), 8-bit converted, center-cropped and resized."""
    with Image.open(io.BytesIO(raw)) as img:
        return _to_chw(img, resolution, channels)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _url(fs, path: str) -> str:
    """A path of ``fs`` as a URL any process can open (local paths stay paths)."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _read(url: str) -> bytes:
    """A whole file's bytes (local paths without fsspec's per-call overhead)."""
    if "://" not in url:
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb") as f:
        return f.read()


class FolderSource(Source):
    """root/<class name>/<image files>; classes sorted by name, files sorted within a class."""

    def __init__(self, cfg: IngestConfig, root: str):
        fs, path = fsspec.core.url_to_fs(root)
        local = _is_local(fs)
        path = path.rstrip("/")

        def listing(folder: str) -> list[tuple[str, bool]]:  # (name, is a folder); os.scandir: no stat per file
            if local:
                with os.scandir(folder) as it:
                    return [(e.name, e.is_dir()) for e in it]
            return [(os.path.basename(e["name"].rstrip("/")), e["type"] == "directory") for e in fs.ls(folder)]

        classes = sorted(name for name, is_dir in listing(path) if is_dir and not name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<images>")
        self.files: list[tuple[str, int]] = []
        for idx, name in enumerate(classes):
            found = sorted(
                f for f, is_dir in listing(f"{path}/{name}") if not is_dir and f.lower().endswith(IMAGE_EXTENSIONS)
            )
            self.files += [(_url(fs, f"{path}/{name}/{f}"), idx) for f in found]
        if not self.files:
            raise ValueError(f"image folder {root!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.class_names = classes

    def __len__(self) -> int:
        return len(self.files)

    def _unit(self, start: int, stop: int) -> dict:
        return {"kind": "files", "files": self.files[start:stop]}

    def validate(self, cfg: IngestConfig) -> None:
        _check_first(self.units(min(len(self), 16))[0], cfg, "image folder")


class ParquetSource(Source):
    """Parquet file(s) with an encoded image column (bytes, or the dataset hubs' {bytes, path}
    struct) and an integer label column; class names from the hub's metadata when it has them."""

    def __init__(self, cfg: IngestConfig, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise ValueError(f"Parquet source {url!r} does not exist")
        files = sorted(f for f in fs.find(path) if f.endswith(".parquet")) if fs.isdir(path) else [path]
        if not files:
            raise ValueError(f"Parquet source {url!r} holds no .parquet files")
        self.files, self.rows = [], []
        names: list[str] | None = None
        label_max = -1
        for f in files:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema = pf.schema_arrow
                for col in (cfg.image_column, cfg.label_column):
                    if col not in schema.names:
                        raise ValueError(
                            f"Parquet source {_url(fs, f)!r} has no column {col!r}; its columns are {schema.names}"
                        )
                labels = pf.read(columns=[cfg.label_column], use_threads=False).column(0)
                if not (labels.type.id in range(2, 10) or str(labels.type).startswith(("int", "uint"))):
                    raise ValueError(
                        f"Parquet source {_url(fs, f)!r}: label column {cfg.label_column!r} holds {labels.type}, "
                        "not integer class ids; set label_column=<the integer column>"
                    )
                if len(labels):
                    label_max = max(label_max, int(np.max(labels.to_numpy(zero_copy_only=False))))
                names = names or _hub_class_names(schema, cfg.label_column)
                self.files.append(_url(fs, f))
                self.rows.append(pf.metadata.num_rows)
        self.n = sum(self.rows)
        if self.n == 0:
            raise ValueError(f"Parquet source {url!r} has no rows")
        self.class_names = names if names and len(names) > label_max else [str(i) for i in range(label_max + 1)]
        self.columns = [cfg.image_column, cfg.label_column]

    def __len__(self) -> int:
        return self.n

    def _unit(self, start: int, stop: int) -> dict:
        return {"kind": "parquet", "columns": self.columns, "pieces": _pieces(self.files, self.rows, start, stop)}

    def validate(self, cfg: IngestConfig) -> None:
        _check_first(self.units(min(self.n, 16))[0], cfg, "Parquet source")


def _hub_class_names(schema, label_column: str) -> list[str] | None:
    """Class names from a Hugging Face dataset's Parquet metadata (its ClassLabel feature)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][label_column]
        return [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
    except (TypeError, KeyError, ValueError):
        return None


def _pieces(files: list[str], counts: list[int], start: int, stop: int) -> list[list]:
    """[file, first, stop) pieces of the global item range [start, stop) over files of ``counts`` items."""
    out, offset = [], 0
    for f, n in zip(files, counts):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append([f, lo - offset, hi - offset])
        offset += n
    return out


WDS_IMAGE = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "ppm")


def _wds_samples(tf: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """A WebDataset tar's samples in order: (key, {extension: member}); a sample's files are
    consecutive members that share the key (the path up to the first dot of the file name)."""
    key, members = None, {}
    for m in tf:
        if not m.isfile():
            continue
        d, base = os.path.split(m.name)
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        k = f"{d}/{stem}" if d else stem
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[ext.lower()] = m
    if key is not None:
        yield key, members


def _wds_label(tf: tarfile.TarFile, members: dict, json_key: str) -> int | None:
    if "cls" in members:
        return int(tf.extractfile(members["cls"]).read().decode().strip())
    if "json" in members:
        value = json.loads(tf.extractfile(members["json"]).read()).get(json_key)
        return None if value is None else int(value)
    return None


def _scan_tar(url: str, json_key: str) -> dict:
    """One tar's sample count and label histogram (read once, before any work)."""
    counts: dict[int, int] = {}
    n = unlabeled = 0
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for _, members in _wds_samples(tf):
            n += 1
            label = _wds_label(tf, members, json_key)
            if label is None:
                unlabeled += 1
            else:
                counts[label] = counts.get(label, 0) + 1
    return {"samples": n, "labels": counts, "unlabeled": unlabeled}


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``a-{000..099}.tar`` (zero-padded ranges) and ``{x,y}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        options = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in expand_braces(head + o + tail)]


class WebDatasetSource(Source):
    """WebDataset tar shards: samples of ``<key>.jpg|png|webp|...`` with a ``<key>.cls`` label (an
    integer) or a ``<key>.json`` holding one under ``label_column``; other files (captions) are
    ignored. Without any label in the whole dataset every sample is class 0 (unconditional)."""

    def __init__(self, cfg: IngestConfig, spec: str):
        if "{" in spec:
            tars = expand_braces(spec)
        else:
            fs, path = fsspec.core.url_to_fs(spec)
            if not fs.exists(path):
                raise ValueError(f"WebDataset source {spec!r} does not exist")
            found = sorted(f for f in fs.find(path) if f.endswith(".tar")) if fs.isdir(path) else [path]
            tars = [_url(fs, f) for f in found]
        if not tars:
            raise ValueError(f"WebDataset source {spec!r} holds no .tar shards")
        self.label_key = cfg.label_column
        self._check_first_tar(tars[0])
        with ThreadPoolExecutor(16) as pool:  # headers and labels only: I/O bound
            scans = list(pool.map(lambda t: _scan_tar(t, self.label_key), tars))
        self.tars = tars
        self.counts = [s["samples"] for s in scans]
        labels: dict[int, int] = {}
        for s in scans:
            for k, v in s["labels"].items():
                labels[k] = labels.get(k, 0) + v
        self.labeled = bool(labels)
        if labels and min(labels) < 0:
            raise ValueError(f"WebDataset source {spec!r} has a negative class label ({min(labels)})")
        self.class_names = [str(i) for i in range(max(labels) + 1)] if labels else ["unlabeled"]
        self.info = {"tars": len(tars), "unlabeled_samples": sum(s["unlabeled"] for s in scans) if labels else 0}
        if not self.labeled:
            log.info("WebDataset %s has no .cls or .json labels: every sample is class 0 (unconditional)", spec)
        if sum(self.counts) == 0:
            raise ValueError(f"WebDataset source {spec!r} holds no samples (files named <key>.<ext>)")

    def _check_first_tar(self, url: str) -> None:
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for i, (key, members) in enumerate(_wds_samples(tf)):
                    if not any(e in members for e in WDS_IMAGE):
                        raise ValueError(
                            f"WebDataset shard {url!r}: sample {key!r} has no image file (found "
                            f"{sorted(members)}; expected one of {', '.join(WDS_IMAGE)})"
                        )
                    if i == 8:
                        break
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"WebDataset shard {url!r} is not a readable tar file ({e})") from e

    def __len__(self) -> int:
        return sum(self.counts)

    def _unit(self, start: int, stop: int) -> dict:
        return {
            "kind": "tar",
            "label_key": self.label_key,
            "labeled": self.labeled,
            "pieces": _pieces(self.tars, self.counts, start, stop),
        }

    def validate(self, cfg: IngestConfig) -> None:
        _check_first(self.units(min(len(self), 16))[0], cfg, "WebDataset source")


def _check_first(unit: dict, cfg: IngestConfig, what: str) -> None:
    part = load_unit(unit, cfg.resolution, cfg.channels)
    if len(part["ids"]) == 0:
        raise ValueError(
            f"{what} {cfg.source!r} produced no readable samples among its first {unit['stop'] - unit['start']} "
            f"({', '.join(part['skipped'][:3])}); check the files, their format and the image/label columns"
        )


def _items(unit: dict) -> Iterator[tuple[int, int | None, bytes | None, str]]:
    """(position, label, encoded image or None, where) of each item of a unit."""
    pos = unit["start"]
    if unit["kind"] == "files":
        for path, label in unit["files"]:
            try:
                raw = _read(path)
            except OSError:
                raw = None
            yield pos, label, raw, path
            pos += 1
    elif unit["kind"] == "parquet":
        image_col, label_col = unit["columns"]
        for url, lo, hi in unit["pieces"]:
            with fsspec.open(url, "rb") as f:
                pf = pq.ParquetFile(f)
                starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
                groups = [g for g in range(pf.num_row_groups) if starts[g] < hi and starts[g + 1] > lo]
                # use_threads=False: see ddm.data.shards.read_parquet_bytes (pyarrow exit aborts).
                table = pf.read_row_groups(groups, columns=[image_col, label_col], use_threads=False)
                table = table.slice(lo - starts[groups[0]], hi - lo)
            images, labels = table.column(0).to_pylist(), table.column(1).to_pylist()
            for r, (img, label) in enumerate(zip(images, labels)):
                raw = img.get("bytes") if isinstance(img, dict) else img
                yield pos, label, raw, f"{url} row {lo + r}"
                pos += 1
    elif unit["kind"] == "tar":
        for url, lo, hi in unit["pieces"]:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                for k, (key, members) in enumerate(_wds_samples(tf)):
                    if k >= hi:
                        break
                    if k < lo:
                        continue
                    where = f"{url}:{key}"
                    ext = next((e for e in WDS_IMAGE if e in members), None)
                    raw = tf.extractfile(members[ext]).read() if ext else None
                    try:
                        label = _wds_label(tf, members, unit["label_key"]) if unit["labeled"] else 0
                    except (ValueError, UnicodeDecodeError):
                        label = None
                    yield pos, label, raw, where
                    pos += 1
    else:
        raise ValueError(f"unknown unit kind {unit['kind']!r}")


def load_unit(unit: dict, resolution: int, channels: int) -> dict:
    """Read, decode, convert and resize one unit's items (an unreadable or unlabeled one is
    skipped and listed); every sample of a unit must come out with the same shape."""
    ids, arrays, labels, skipped = [], [], [], []
    for pos, label, raw, where in _items(unit):
        if label is None:
            skipped.append(where)
            log.warning("skipping %s: it has no label", where)
            continue
        try:
            if raw is None:
                raise OSError("no image bytes")
            arr = decode(raw, resolution, channels or 3)
        except UNREADABLE as e:
            skipped.append(where)
            log.warning("skipping unreadable image %s (%s)", where, type(e).__name__)
            continue
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(
                f"{where} has shape {arr.shape} but earlier samples have {arrays[0].shape}; "
                "set resolution=<side> so every image is resized to one size"
            )
        ids.append(pos), arrays.append(arr), labels.append(int(label))
    return {
        "index": unit["index"],
        "ids": np.asarray(ids, dtype=np.int64),
        "arrays": np.stack(arrays) if arrays else np.zeros((0,), np.uint8),
        "labels": np.asarray(labels, dtype=np.int32),
        "skipped": skipped,
    }


def generated_units(source: Source, units: list[dict]) -> Iterator[dict]:
    """A generated source's samples, in order, cut into ``units`` (ids are positions)."""
    it = iter(source.generate())
    for unit in units:
        got = [next(it) for _ in range(unit["stop"] - unit["start"])]
        yield {
            "index": unit["index"],
            "ids": np.arange(unit["start"], unit["stop"], dtype=np.int64),
            "arrays": np.stack([a for _, a in got]),
            "labels": np.asarray([label for label, _ in got], dtype=np.int32),
            "skipped": [],
        }


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
        if any(n.endswith(".tar") for n in names):
            return WebDatasetSource(cfg, src)
        if any(n.endswith(".parquet") for n in names):
            return ParquetSource(cfg, src)
        return FolderSource(cfg, src)
    raise ValueError(f"source {src!r} is a file that is not .parquet or .tar; point at the folder or shards")
