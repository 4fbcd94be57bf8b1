"""``ddm ingest``: a source dataset -> Parquet shards + a committed dataset manifest in the store.

Sources:
  digits              scikit-learn's bundled 8x8 handwritten digits (1 797 images, 10 classes; offline)
  glyphs:N            N characters rendered from fonts (62 classes, 16x16; offline; ``ddm.data.glyphs``)
  synthetic:N         N procedurally drawn images (class-dependent blobs), for tests and benchmarks
  <folder>            an image folder with one sub-folder per class (png, jpg, jpeg, bmp, webp, gif),
                      or images at its top (unlabeled)
  <file.parquet|dir>  Parquet with an encoded-image column (bytes or the hubs' {bytes, path}) and labels
                      (label_column="": unlabeled)
  <shards.tar|dir>    WebDataset tar shards (<key>.jpg|png|webp + <key>.cls or .json labels);
                      brace patterns work: s3://bucket/imagenet/train-{0000..1023}.tar
Folders, Parquet and tars may live in any fsspec store (s3://..., gs://..., local paths).

Captions (``caption``; text-conditioned experts train on them) go into a ``caption`` column of
the shards: a Parquet column (``caption=TEXT``), a WebDataset member (``caption=txt``, or
``json:<key>``), a sidecar beside each image of a folder (``caption=txt``: ``cat.png`` ->
``cat.txt``), what the glyph renderer drew (``caption=describe``), or ``auto`` (the source's usual
place). A sample without one gets "" (encoded as the empty caption, not the model's learned null
caption); the manifest counts them.

How it runs: a Ray Data pipeline (``runner=ray``; ``auto``, the default, picks it for file sources
of more than one shard) on the local Ray runtime, or on a cluster with ``--address``: read +
decode + resize on CPU tasks (``workers`` at once), encode on an actor pool that takes GPUs when
the cluster has them (``encode_actors``, ``actors_per_gpu``, ``encode_batch_size``), each output
shard written and committed on its own (``ddm.data.pipeline``). Generated sources run in this process
(``runner=local``), and the two give byte-identical shards. A killed ingest re-run with the same
config redoes only the shards it had not committed; the dataset manifest is written last.

Images are center-cropped and resized to ``resolution``. Unreadable images are skipped, counted
and listed in the manifest (``skipped``) and the log, so one bad file does not sink a
million-image ingest; if every file is unreadable the ingest fails. A source's first samples are
decoded before any other work, so a wrong column, path or format fails at once.

Encoders: ``identity`` stores uint8 pixels (C, H, W); ``vae`` (or ``vae:<hub id>``) stores SD-VAE
latents, the latent distribution's mean as float16 (diffusers' AutoencoderKL; needs diffusers and
the weights, and says so when they are missing); ``vae:random`` is SD-VAE's architecture with
random weights, for tests and throughput benchmarks only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time

import numpy as np

from ddm import __version__
from ddm.core.config import to_dict
from ddm.core.logs import progress
from ddm.core.secrets import redact_url
from ddm.data.config import INGEST_EXECUTION as EXECUTION
from ddm.data.config import IngestConfig
from ddm.data.pipeline import ShardCommits, Stage, connected, model_stage, run_units, worker_url
from ddm.data.shards import DATASET_FORMAT, check_format, encode_shard, shard_name
from ddm.data.sources import generated_units, load_unit, open_source
from ddm.store import Store
from ddm.store.layout import DATA_DIR
from ddm.store.lease import Token, fenced, holding

log = logging.getLogger("ddm.ingest")

# --- ingest -----------------------------------------------------------------------------------


def ingest(cfg: IngestConfig, store: Store, address: str | None = None) -> dict:
    """Write ``cfg.source`` into ``store`` as shards and commit the dataset manifest.

    Re-running with the same config on a store that already holds the committed dataset does
    nothing and returns its manifest; a different config there is an error (nothing is overwritten).
    A crashed ingest's committed shards are kept and the rest redone when the config is the same
    (another config's leftovers are removed). One ingest writes at a time: it holds the lease on
    data/ (``ddm.store.lease``), and a second one is refused. ``address``: the Ray cluster for
    ``runner=ray`` (default: the one this process is connected to, or a local runtime).
    """
    store.check_reachable()
    done = _ingested(cfg, store)
    if done is not None:
        return done
    with holding(store, DATA_DIR, "ddm ingest") as (writes, token):
        return _ingested(cfg, writes) or _ingest(cfg, writes, token, address)


def _ingested(cfg: IngestConfig, store: Store) -> dict | None:
    """The committed dataset's manifest if it was ingested with ``cfg``; None if there is none."""
    if not store.is_committed(DATA_DIR):
        return None
    manifest = check_format(store.manifest(DATA_DIR), DATASET_FORMAT, f"{store.url}/{DATA_DIR}/MANIFEST.json")
    # Fields added in later versions count as their defaults in older manifests.
    made = {**IngestConfig().identity(), **{k: v for k, v in manifest.get("ingest", {}).items() if k not in EXECUTION}}
    if made == cfg.identity():
        log.info("dataset already ingested in %s/%s; nothing to do", store.url, DATA_DIR)
        return manifest
    raise ValueError(
        f"{store.url}/{DATA_DIR} already holds a dataset ingested with a different config "
        f"(source {manifest.get('ingest', {}).get('source')!r}); use a new store root for a new dataset"
    )


def choose_runner(cfg: IngestConfig, generated: bool, units: int, address: str | None, store: Store) -> str:
    """Generated sources are made in order by this process. File sources run where ``runner`` says;
    auto: Ray Data, except for a source of one shard without a cluster address (tiny data: no Ray
    start) or a store in this process's memory."""
    if generated:
        if cfg.runner == "ray":
            log.info("source %s is generated in order by one process: it runs here, not on Ray", cfg.source)
        return "local"
    if cfg.runner == "auto":
        return "ray" if (units > 1 or address) and store.protocol != "memory" else "local"
    return cfg.runner


def _ingest(cfg: IngestConfig, store: Store, token: Token, address: str | None) -> dict:
    t0 = time.perf_counter()
    worker_url(store, cfg.runner)  # a store Ray workers cannot reach fails before anything is read
    source = open_source(cfg)
    source.validate(cfg)  # the first samples decode, before anything is written or started
    encoder = EncodeUnit(cfg.encoder, cfg.encode_batch_size, cfg.seed) if cfg.encoder != "identity" else None
    text = EmbedCaptions(cfg, store.url) if cfg.text_encoder else None
    units = source.units(cfg.shard_size)
    commits = ShardCommits(store, DATA_DIR)
    plan = {
        "ingest": cfg.identity(),
        "num_units": len(units),
        "class_names": source.class_names,
        "units": _digest(units),
    }
    done = commits.start(plan)
    todo = [u for u in units if u["index"] not in done]
    runner = "local" if not todo else choose_runner(cfg, source.generated, len(units), address, store)
    url = worker_url(store, runner)
    encoding, embedding = encoder is not None, text is not None
    if runner != "local":  # Ray's actors load their own copies: this process's checked ones go
        encoder = text = None
        _release_gpu_memory()
    log.info(
        "ingest %s: %d samples in %d shards (%d to do) on %s",
        cfg.source,
        len(source),
        len(units),
        len(todo),
        "Ray Data" if runner == "ray" else "this process",
    )
    write = Stage("write", lambda: WriteShard(url, token))
    with connected(runner, address):
        stages = [] if source.generated else [Stage("read", lambda: ReadUnit(cfg), concurrency=cfg.workers or None)]
        pools = encoding + embedding  # network stages sharing the GPUs
        if encoding:  # it loaded here (a missing package or weights failed before any write)
            stages.append(_encode_stage(cfg, runner, encoder, pools))
        if embedding:  # likewise
            make = (lambda: text) if runner == "local" else (lambda: EmbedCaptions(cfg, url))
            stages.append(model_stage("embed captions", make, runner, cfg.encode_actors, cfg.actors_per_gpu, pools))
        stages.append(write)
        if source.generated:  # made here, in order; committed shards are made again but not rewritten
            steps = [s.make() for s in stages]
            records = []
            for part in progress(generated_units(source, units), total=len(units), desc="ingest", unit="shard"):
                if part["index"] in done:
                    continue
                for step in steps:
                    part = step(part)
                records.append(part)
        else:
            records = list(run_units(todo, stages, runner, "ingest"))
    records = {**done, **{r["index"]: r for r in records}}
    return _commit(cfg, commits, source, records, len(done), time.perf_counter() - t0)


def _release_gpu_memory() -> None:
    """What torch's allocator keeps of freed GPU memory, handed back (to the GPUs' other users)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_stage(cfg: IngestConfig, runner: str, loaded: EncodeUnit | None, pools: int = 1) -> Stage:
    """The encoder: in this process the copy the driver loaded; on Ray an actor pool, each actor
    loading its own copy on its GPU if it has one."""
    make = (lambda: loaded) if runner == "local" else (lambda: EncodeUnit(cfg.encoder, cfg.encode_batch_size, cfg.seed))
    return model_stage("encode", make, runner, cfg.encode_actors, cfg.actors_per_gpu, pools)


class ReadUnit:
    """Read, decode and resize one unit (a CPU task)."""

    def __init__(self, cfg: IngestConfig):
        self.resolution, self.channels = cfg.resolution, cfg.channels

    def __call__(self, unit: dict) -> dict:
        return load_unit(unit, self.resolution, self.channels)


class EncodeUnit:
    """A unit's images -> SD-VAE latents (an actor: the VAE loads once)."""

    def __init__(self, spec: str, batch_size: int, seed: int):
        from ddm.data.encoders import VAEEncoder  # torch: in the worker that encodes only

        self.encoder = VAEEncoder(spec, batch_size, seed)

    def __call__(self, part: dict) -> dict:
        if len(part["ids"]):
            part["arrays"] = self.encoder(part["arrays"])
        return part


class EmbedCaptions:
    """A unit's captions -> the frozen text encoder's embeddings, stored beside its images: tokens
    (N, L, E) and pooled (N, E) in ``text_dtype``, the number of attended tokens (N,) (an actor: the
    encoder loads once, on this worker's GPU if it has one)."""

    def __init__(self, cfg: IngestConfig, store: str):
        from ddm.data.encoders import device  # torch: in the worker that encodes only
        from ddm.models.text_encoder import TextEncoder  # torch: in the worker that encodes only

        self.encoder = TextEncoder.load(cfg.text_encoder, cfg.text_length, device(), store)  # store: its URL
        self.dtype, self.batch_size = np.dtype(cfg.text_dtype), cfg.encode_batch_size

    def __call__(self, part: dict) -> dict:
        captions = part["captions"]
        tokens, lengths, pooled = [], [], []
        for i in range(0, len(captions), self.batch_size):
            emb = self.encoder.encode(captions[i : i + self.batch_size])
            tokens.append(emb.tokens.cpu().numpy().astype(self.dtype))
            lengths.append(emb.mask.sum(1).cpu().numpy().astype(np.int16))
            pooled.append(emb.pooled.cpu().numpy().astype(self.dtype))
        if tokens:
            part["text_tokens"], part["text_lengths"] = np.concatenate(tokens), np.concatenate(lengths)
            part["text_pooled"] = np.concatenate(pooled)
        part["text_encoder"] = self.encoder.describe()
        return part


class WriteShard:
    """Write one unit's shard and commit it (its progress record); returns the record."""

    def __init__(self, url: str, token: Token):
        self.commits = ShardCommits(fenced(Store(url), token), DATA_DIR)

    def __call__(self, part: dict) -> dict:
        ids, arrays, labels, captions = part["ids"], part["arrays"], part["labels"], part.get("captions")
        record = {
            "rows": len(ids),
            "skipped": part["skipped"],
            "label_counts": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))},
            "sample_shape": list(arrays.shape[1:]) if len(ids) else None,
            "dtype": str(arrays.dtype),
        }
        if captions is not None:
            record["captions"] = {
                "empty": sum(not c for c in captions),
                "max_chars": max(map(len, captions), default=0),
                "examples": captions[:3],
            }
        text = {k: part[k] for k in ("text_tokens", "text_lengths", "text_pooled") if k in part} or None
        if "text_encoder" in part:
            record["text_encoder"] = part["text_encoder"]
        files = {shard_name(part["index"]): encode_shard(ids, arrays, labels, captions, text)} if len(ids) else {}
        return self.commits.commit(part["index"], files, record)


def _captions(cfg: IngestConfig, source, written: list[dict], n: int) -> dict | None:
    """The manifest's account of the captions: where from, how many empty, the longest, examples."""
    if not source.caption:
        return None
    per_shard = [r["captions"] for r in written]
    return {
        "source": source.caption,  # the setting, with auto resolved (a column, a member, describe)
        "count": n,
        "empty": sum(c["empty"] for c in per_shard),
        "max_chars": max(c["max_chars"] for c in per_shard),
        "examples": [e for c in per_shard for e in c["examples"]][:5],
    }


def _text_embeddings(cfg: IngestConfig, written: list[dict]) -> dict | None:
    """What the stored caption embeddings are: the encoder (as it describes itself), their shape,
    dtype and bytes per sample."""
    if not cfg.text_encoder:
        return None
    enc = written[0]["text_encoder"]
    per = np.dtype(cfg.text_dtype).itemsize
    return {
        "encoder": enc,
        "dim": enc["hidden_size"],
        "length": enc["max_length"],
        "dtype": cfg.text_dtype,
        "bytes_per_sample": enc["max_length"] * enc["hidden_size"] * per + enc["hidden_size"] * per + 2,
    }


def _digest(units: list[dict]) -> str:
    return hashlib.sha256(json.dumps(units, sort_keys=True).encode()).hexdigest()


def _commit(
    cfg: IngestConfig, commits: ShardCommits, source, records: dict[int, dict], resumed: int, seconds: float
) -> dict:
    ordered = [records[i] for i in sorted(records)]
    skipped = [s for r in ordered for s in r["skipped"]]
    written = [r for r in ordered if r["rows"]]
    if not written:
        raise ValueError(
            f"source {cfg.source!r} produced no readable samples ({len(skipped)} unreadable); nothing was written"
        )
    shapes = {tuple(r["sample_shape"]) for r in written}
    if len(shapes) > 1:
        raise ValueError(
            f"shards came out with different sample shapes {sorted(shapes)}; set resolution=<side> so every image "
            "is resized to one size"
        )
    label_counts: dict[int, int] = {}
    for r in written:
        for k, v in r["label_counts"].items():
            label_counts[int(k)] = label_counts.get(int(k), 0) + v
    stored_shape, dtype = list(shapes.pop()), written[0]["dtype"]
    n = sum(r["rows"] for r in written)
    meta = {
        "kind": "ddm.dataset",
        "format_version": DATASET_FORMAT,
        "ddm_version": __version__,
        "num_samples": n,
        "shards": [shard_name(r["index"]) for r in written],
        "shard_rows": [r["rows"] for r in written],
        "sample_shape": stored_shape,
        "dtype": dtype,
        "encoder": cfg.encoder,
        "encoder_weights": _encoder_weights(cfg.encoder),  # which hub weights, at which commit
        "value_range": [0, 255] if cfg.encoder == "identity" else None,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "label_counts": {str(k): v for k, v in sorted(label_counts.items())},
        "skipped": {"count": len(skipped), "examples": skipped[:20]},
        "captions": _captions(cfg, source, written, n),
        "text_embeddings": _text_embeddings(cfg, written),
        "ingest": {**to_dict(cfg), "source": redact_url(cfg.source)},  # no user:password@, no signed query
        "source_info": getattr(source, "info", {}),
        "resumed_shards": resumed,  # units an interrupted earlier run had committed
        "seconds": seconds,
    }
    manifest = commits.finish(ordered, meta)
    if skipped:
        log.warning("%d unreadable samples were skipped (listed in the manifest under 'skipped')", len(skipped))
    if meta["captions"]:
        c = meta["captions"]
        (log.warning if c["empty"] else log.info)(
            "captions (%s): %d of %d samples have none (the empty caption)", c["source"], c["empty"], n
        )
    log.info(
        "ingested %d samples of shape %s into %d shards at %s/%s",
        n,
        tuple(stored_shape),
        len(written),
        commits.store.url,
        DATA_DIR,
    )
    return manifest


def _encoder_weights(spec: str) -> dict | None:
    """The hub id and revision an ``encoder`` spec loads (``ddm.data.encoders.hub_model``)."""
    if spec == "identity":
        return None
    from ddm.data.encoders import DEFAULT_VAE, hub_model  # torch and diffusers: only for a VAE ingest

    model, revision = hub_model(spec, DEFAULT_VAE)
    return {"model": model, "revision": revision}
