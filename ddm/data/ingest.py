"""``ddm ingest``: a source dataset -> Parquet shards + a committed dataset manifest in the store.

Sources:
  digits              scikit-learn's bundled 8x8 handwritten digits (1 797 images, 10 classes; offline)
  synthetic:N         N procedurally drawn images (class-dependent blobs), for tests and benchmarks
  <folder>            an image folder with one sub-folder per class (png, jpg, jpeg, bmp, webp, gif)
  <file.parquet|dir>  existing Parquet with an encoded-image column and a label column

Images are center-cropped and resized to ``resolution``. Unreadable image files are skipped,
counted and listed in the manifest (``skipped``) and the log, so one bad file does not sink a
million-image ingest; if every file is unreadable the ingest fails.

Encoders: ``identity`` stores uint8 pixels (C, H, W); ``vae`` (or ``vae:<hub id>``) stores SD-VAE
latents (diffusers' AutoencoderKL; needs diffusers and the weights, and says so when they are missing).
"""

from __future__ import annotations

import abc
import io
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterator

import fsspec
import pyarrow.dataset as pads
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
import numpy as np
from tqdm.auto import tqdm

from ddm.config import to_dict
from ddm.data.shards import encode_shard, shard_name
from ddm.layout import DATA_DIR, SHARDS_DIR
from ddm.store import Store

log = logging.getLogger("ddm.ingest")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


@dataclass(frozen=True)
class IngestConfig:
    """How a source becomes shards.

    resolution: output side in pixels (0 keeps the source's own, which must then be uniform).
    channels: 1 (grayscale) or 3 (RGB); 0 picks the source's natural choice (digits: 1, else 3).
    shard_size: samples per Parquet shard; readers and partitioning stream shard by shard.
    """

    source: str = "digits"
    resolution: int = 0
    channels: int = 0
    shard_size: int = 4096
    encoder: str = "identity"
    image_column: str = "image"  # Parquet sources
    label_column: str = "label"
    seed: int = 0  # synthetic sources

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty: give digits, synthetic:N, an image folder or a Parquet path")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or 0 (source default), got {self.channels}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.encoder != "identity" and self.encoder != "vae" and not self.encoder.startswith("vae:"):
            raise ValueError(f"encoder {self.encoder!r} is unknown; use identity, vae or vae:<hub id>")


# --- sources: each yields (label, uint8 array (C, H, W)) and knows its class names ------------


class Source(abc.ABC):
    """Yields (label, uint8 array (C, H, W)); knows its class names and what it had to skip."""

    class_names: list[str]
    skipped: list[str]

    @abc.abstractmethod
    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...


def _to_chw(img, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> center-cropped, resized uint8 (C, H, W)."""
    img = img.convert("L" if channels == 1 else "RGB")
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

    def __init__(self, cfg: IngestConfig):
        digits = load_digits()
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        self.labels = digits.target.astype(np.int64)
        self.class_names = [str(i) for i in range(10)]
        self.skipped = []
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        res, ch = self.cfg.resolution, self.cfg.channels or 1
        for img, label in zip(self.images, self.labels):
            if (res in (0, 8)) and ch == 1:
                yield int(label), img[None]
            else:
                yield int(label), _to_chw(Image.fromarray(img), res or 8, ch)


class SyntheticSource(Source):
    """N small images of class-dependent Gaussian blobs plus noise, generated deterministically."""

    def __init__(self, cfg: IngestConfig, n: int, num_classes: int = 10):
        if n < 1:
            raise ValueError(f"synthetic source needs N >= 1, got {n}")
        self.n, self.cfg, self.num_classes = n, cfg, num_classes
        self.class_names = [f"blob{i}" for i in range(num_classes)]
        self.skipped = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
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


class FolderSource(Source):
    """root/<class name>/<image files>; classes sorted by name, files sorted within a class."""

    def __init__(self, cfg: IngestConfig, root: str):
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root!r} has no class sub-folders; expected {root}/<class>/<images>")
        self.files: list[tuple[str, int]] = []
        for idx, name in enumerate(classes):
            folder = os.path.join(root, name)
            for f in sorted(os.listdir(folder)):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    self.files.append((os.path.join(folder, f), idx))
        if not self.files:
            raise ValueError(f"image folder {root!r} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.class_names = classes
        self.cfg = cfg
        self.skipped = []

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        for path, label in self.files:
            try:
                with Image.open(path) as img:
                    arr = _to_chw(img, self.cfg.resolution, self.cfg.channels or 3)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                self.skipped.append(path)
                log.warning("skipping unreadable image %s (%s)", path, type(e).__name__)
                continue
            yield label, arr


class ParquetSource(Source):
    """Parquet file(s) with an encoded image column (bytes, or a {bytes, path} struct) and labels."""

    def __init__(self, cfg: IngestConfig, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            raise ValueError(f"Parquet source {url!r} does not exist")
        self.dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = self.dataset.schema.names
        for col in (cfg.image_column, cfg.label_column):
            if col not in names:
                raise ValueError(f"Parquet source {url!r} has no column {col!r}; its columns are {names}")
        self.n = self.dataset.count_rows()
        if self.n == 0:
            raise ValueError(f"Parquet source {url!r} has no rows")
        labels = self.dataset.to_table(columns=[cfg.label_column], use_threads=False).column(0).to_numpy()
        self.class_names = [str(i) for i in range(int(labels.max()) + 1)]
        self.cfg = cfg
        self.skipped = []

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        cfg = self.cfg
        row = 0
        # use_threads=False: see ddm.data.shards.read_parquet_bytes (pyarrow exit aborts).
        for batch in self.dataset.to_batches(columns=[cfg.image_column, cfg.label_column], use_threads=False):
            images, labels = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            for img, label in zip(images, labels):
                raw = img["bytes"] if isinstance(img, dict) else img
                try:
                    with Image.open(io.BytesIO(raw)) as im:
                        arr = _to_chw(im, cfg.resolution, cfg.channels or 3)
                except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
                    self.skipped.append(f"row {row}")
                    log.warning("skipping unreadable image in row %d (%s)", row, type(e).__name__)
                    row += 1
                    continue
                row += 1
                yield int(label), arr


def open_source(cfg: IngestConfig) -> Source:
    src = cfg.source
    if src == "digits":
        return DigitsSource(cfg)
    if src.startswith("synthetic:"):
        try:
            n = int(src.split(":", 1)[1])
        except ValueError as e:
            raise ValueError(f"source {src!r}: expected synthetic:<number of samples>") from e
        return SyntheticSource(cfg, n)
    if "://" not in src and os.path.isdir(src) and not any(f.endswith(".parquet") for f in os.listdir(src)):
        return FolderSource(cfg, src)
    if src.endswith(".parquet") or "://" in src or os.path.isdir(src):
        return ParquetSource(cfg, src)
    raise ValueError(f"source {src!r} does not exist; use digits, synthetic:N, an image folder or a Parquet path")


# --- encoders ---------------------------------------------------------------------------------


class VAEEncoder:
    """SD-VAE latents (paper: 256px images -> 32x32x4) via diffusers' AutoencoderKL."""

    def __init__(self, spec: str):
        self.model_id = spec.split(":", 1)[1] if ":" in spec else DEFAULT_VAE
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ValueError(
                "encoder=vae needs the diffusers package (pip install diffusers); or use encoder=identity for pixels"
            ) from e
        try:
            self.vae = AutoencoderKL.from_pretrained(self.model_id).eval()
        except Exception as e:  # noqa: BLE001 - hub/network/cache errors come in many types
            raise ValueError(
                f"could not load the VAE weights {self.model_id!r} ({type(e).__name__}); they come from the "
                "Hugging Face hub: make them reachable (network, or HF_HOME with a cached copy) or use encoder=identity"
            ) from e
        self.scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(images).float() / 127.5 - 1.0
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            return (self.vae.encode(x).latent_dist.sample() * self.scale).numpy().astype(np.float16)


# --- ingest -----------------------------------------------------------------------------------


def ingest(cfg: IngestConfig, store: Store) -> dict:
    """Write ``cfg.source`` into ``store`` as shards and commit the dataset manifest.

    Re-running with the same config on a store that already holds the committed dataset does
    nothing and returns its manifest; a different config there is an error (nothing is overwritten).
    Shards left by a crashed ingest (no manifest) are replaced.
    """
    store.check_reachable()
    if store.is_committed(DATA_DIR):
        manifest = store.manifest(DATA_DIR)
        if manifest.get("ingest") == to_dict(cfg):
            log.info("dataset already ingested in %s/%s; nothing to do", store.url, DATA_DIR)
            return manifest
        raise ValueError(
            f"{store.url}/{DATA_DIR} already holds a dataset ingested with a different config "
            f"(source {manifest.get('ingest', {}).get('source')!r}); use a new store root for a new dataset"
        )
    if store.list(f"{DATA_DIR}/{SHARDS_DIR}"):
        log.warning("removing uncommitted shards left by an interrupted ingest in %s/%s", store.url, DATA_DIR)
        store.delete(f"{DATA_DIR}/{SHARDS_DIR}", recursive=True)

    source = open_source(cfg)
    encoder = VAEEncoder(cfg.encoder) if cfg.encoder != "identity" else None
    t0 = time.perf_counter()
    known: dict[str, dict] = {}
    shard_rows: list[int] = []
    label_counts: dict[int, int] = {}
    sample_shape: tuple[int, ...] | None = None
    dtype = "uint8"
    ids, arrays, labels = [], [], []

    stored_shape: tuple[int, ...] = ()  # what the shards hold: pixels, or latents after the encoder

    def flush() -> None:
        nonlocal dtype, stored_shape
        batch = np.stack(arrays)
        if encoder is not None:
            batch = encoder(batch)
        dtype, stored_shape = str(batch.dtype), tuple(batch.shape[1:])
        name = shard_name(len(shard_rows))
        known[name] = store.write_hashed(f"{DATA_DIR}/{name}", encode_shard(np.array(ids), batch, np.array(labels)))
        shard_rows.append(len(ids))
        ids.clear(), arrays.clear(), labels.clear()

    next_id = 0
    for label, arr in tqdm(source, total=len(source), desc="ingest", unit="img", mininterval=1.0):
        if sample_shape is None:
            sample_shape = arr.shape
        elif arr.shape != sample_shape:
            raise ValueError(
                f"sample {next_id} has shape {arr.shape} but earlier samples have {sample_shape}; "
                "set resolution=<side> so every image is resized to one size"
            )
        ids.append(next_id)
        arrays.append(arr)
        labels.append(label)
        label_counts[label] = label_counts.get(label, 0) + 1
        next_id += 1
        if len(ids) == cfg.shard_size:
            flush()
    if ids:
        flush()
    if next_id == 0:
        raise ValueError(
            f"source {cfg.source!r} produced no readable samples ({len(source.skipped)} unreadable); nothing was written"
        )
    meta = {
        "kind": "ddm.dataset",
        "format_version": 1,
        "num_samples": next_id,
        "shard_rows": shard_rows,
        "sample_shape": list(stored_shape),
        "dtype": dtype,
        "encoder": cfg.encoder,
        "value_range": [0, 255] if encoder is None else None,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "label_counts": {str(k): v for k, v in sorted(label_counts.items())},
        "skipped": {"count": len(source.skipped), "examples": source.skipped[:20]},
        "ingest": to_dict(cfg),
        "seconds": time.perf_counter() - t0,
    }
    manifest = store.commit(DATA_DIR, list(known), meta=meta, known=known)
    if source.skipped:
        log.warning("%d unreadable samples were skipped (listed in the manifest under 'skipped')", len(source.skipped))
    log.info("ingested %d samples of shape %s into %d shards at %s/%s", next_id, stored_shape, len(shard_rows), store.url, DATA_DIR)
    return manifest
