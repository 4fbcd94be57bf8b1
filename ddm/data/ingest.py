"""``ddm ingest``: a source dataset -> Parquet shards + a committed dataset manifest in the store.

Sources:
  digits              scikit-learn's bundled 8x8 handwritten digits (1 797 images, 10 classes; offline)
  glyphs:N            N characters rendered from fonts (62 classes, 16x16; offline; ``ddm.data.glyphs``)
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

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ddm.config import to_dict
from ddm.data.shards import encode_shard, shard_name
from ddm.data.sources import VAEEncoder, open_source
from ddm.layout import DATA_DIR, SHARDS_DIR
from ddm.lease import holding
from ddm.logs import progress
from ddm.store import Store

log = logging.getLogger("ddm.ingest")


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
    seed: int = 0  # synthetic and glyph sources
    fonts: list[str] = field(default_factory=list)  # glyphs: font folders/files (empty: matplotlib's own)
    charset: str = ""  # glyphs: the characters, one class each (empty: 0-9, A-Z, a-z)

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("source is empty: give digits, glyphs:N, synthetic:N, an image folder or a Parquet path")
        if self.resolution < 0:
            raise ValueError(f"resolution must be >= 0, got {self.resolution}")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or 0 (source default), got {self.channels}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.encoder != "identity" and self.encoder != "vae" and not self.encoder.startswith("vae:"):
            raise ValueError(f"encoder {self.encoder!r} is unknown; use identity, vae or vae:<hub id>")


# --- ingest -----------------------------------------------------------------------------------


def ingest(cfg: IngestConfig, store: Store) -> dict:
    """Write ``cfg.source`` into ``store`` as shards and commit the dataset manifest.

    Re-running with the same config on a store that already holds the committed dataset does
    nothing and returns its manifest; a different config there is an error (nothing is overwritten).
    Shards left by a crashed ingest (no manifest) are replaced. One ingest writes at a time: it holds
    the lease on data/ (``ddm.lease``), and a second one is refused.
    """
    store.check_reachable()
    done = _ingested(cfg, store)
    if done is not None:
        return done
    with holding(store, DATA_DIR, "ddm ingest") as (writes, _):
        return _ingested(cfg, writes) or _ingest(cfg, writes)


def _ingested(cfg: IngestConfig, store: Store) -> dict | None:
    """The committed dataset's manifest if it was ingested with ``cfg``; None if there is none."""
    if not store.is_committed(DATA_DIR):
        return None
    manifest = store.manifest(DATA_DIR)
    # Fields added in later versions count as their defaults in older manifests.
    if {**to_dict(IngestConfig()), **manifest.get("ingest", {})} == to_dict(cfg):
        log.info("dataset already ingested in %s/%s; nothing to do", store.url, DATA_DIR)
        return manifest
    raise ValueError(
        f"{store.url}/{DATA_DIR} already holds a dataset ingested with a different config "
        f"(source {manifest.get('ingest', {}).get('source')!r}); use a new store root for a new dataset"
    )


def _ingest(cfg: IngestConfig, store: Store) -> dict:
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
    for label, arr in progress(source, total=len(source), desc="ingest", unit="img", mininterval=1.0):
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
            f"source {cfg.source!r} produced no readable samples ({len(source.skipped)} unreadable); nothing was "
            "written"
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
        "source_info": getattr(source, "info", {}),
        "seconds": time.perf_counter() - t0,
    }
    manifest = store.commit(DATA_DIR, list(known), meta=meta, known=known)
    if source.skipped:
        log.warning("%d unreadable samples were skipped (listed in the manifest under 'skipped')", len(source.skipped))
    log.info(
        "ingested %d samples of shape %s into %d shards at %s/%s",
        next_id,
        stored_shape,
        len(shard_rows),
        store.url,
        DATA_DIR,
    )
    return manifest
