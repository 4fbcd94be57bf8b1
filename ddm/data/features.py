"""Feature extractors for partitioning: what "semantically similar" means.

``pca`` (the offline default) projects flattened pixels or latents onto principal components fitted
on a seeded sample of the dataset. ``dinov2`` (the paper's choice) pools DINOv2 features; its
weights come from a model hub, and without them it fails with a message saying so.
Every extractor maps a batch (N, *sample_shape) of stored arrays to (N, dim) float32 features,
and saves what it needs to be re-applied (``state``) into the partition's safetensors file.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ddm import __version__
from ddm.data.pipeline import ShardCommits, Stage, connected, model_stage, run_units, worker_url
from ddm.data.shards import FEATURES_FORMAT, Dataset, check_format
from ddm.store import Store
from ddm.store.layout import features_dir, safe_relpath
from ddm.store.lease import fenced, holding

log = logging.getLogger("ddm.partition")

EXTRACTOR_STATE = "extractor.safetensors"


def to_float(arrays: np.ndarray, dtype: str) -> np.ndarray:
    """Stored arrays -> float32 in about [-1, 1] (uint8 pixels) or as stored (latents), flattened."""
    x = arrays.reshape(len(arrays), -1).astype(np.float32)
    return x / 127.5 - 1.0 if dtype == "uint8" else x


class PCAFeatures:
    """Principal components of a seeded sample of (at most ``fit_samples``) stored arrays."""

    name = "pca"
    neural = False

    def __init__(self, dim: int = 32, fit_samples: int = 10_000, seed: int = 0):
        self.dim, self.fit_samples, self.seed = dim, fit_samples, seed
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def fit(self, dataset: Dataset) -> "PCAFeatures":
        n = dataset.num_samples
        rng = np.random.default_rng(self.seed)
        chosen = np.sort(rng.choice(n, size=min(self.fit_samples, n), replace=False))
        starts = np.cumsum([0] + dataset.shard_rows)
        rows = []
        for i in range(dataset.num_shards):  # only the shards that hold chosen rows are read
            local = chosen[(chosen >= starts[i]) & (chosen < starts[i + 1])] - starts[i]
            if len(local):
                shard = dataset.read_shard(i)
                rows.append(to_float(shard.arrays[local], dataset.dtype))
        x = np.concatenate(rows).astype(np.float64)
        self.mean = x.mean(0)
        # SVD of the centred sample; components are the top right-singular vectors.
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        k = min(self.dim, vt.shape[0])
        self.components = vt[:k].astype(np.float32)
        self.mean = self.mean.astype(np.float32)
        return self

    def __call__(self, arrays: np.ndarray, dtype: str) -> np.ndarray:
        assert self.components is not None, "fit() first"
        return (to_float(arrays, dtype) - self.mean) @ self.components.T

    def state(self) -> dict[str, np.ndarray]:
        return {"pca_mean": self.mean, "pca_components": self.components}


class DINOv2Features:
    """Pooled DINOv2 features (the paper's extractor; ``ddm.data.encoders``); images resized to 224 px."""

    name = "dinov2"
    neural = True

    def __init__(self, spec: str = "dinov2", batch_size: int = 64, seed: int = 0):
        self.spec, self.batch_size, self.seed = spec, batch_size, seed
        self.model = None

    def load(self) -> "DINOv2Features":
        """Load the network (in the worker that runs it; the driver only checks that it loads)."""
        from ddm.data.encoders import DINOv2Model  # torch and transformers: in the worker that runs DINOv2 only

        self.model = DINOv2Model(self.spec, self.batch_size, seed=self.seed)
        return self

    def fit(self, dataset: Dataset) -> "DINOv2Features":
        if dataset.dtype != "uint8":
            raise ValueError("features=dinov2 needs pixel data (encoder=identity); these shards hold latents")
        return self

    def __call__(self, arrays: np.ndarray, dtype: str) -> np.ndarray:
        if self.model is None:
            self.load()
        return self.model(arrays)

    def state(self) -> dict[str, np.ndarray]:
        return {}


def build_extractor(spec: str, dim: int, fit_samples: int, seed: int, batch_size: int = 64):
    """``pca`` or ``dinov2`` / ``dinov2:<hub id>`` / ``dinov2:random`` (its architecture, random weights)."""
    if spec == "pca":
        return PCAFeatures(dim, fit_samples, seed)
    if spec == "dinov2" or spec.startswith("dinov2:"):
        return DINOv2Features(spec, batch_size, seed)
    raise ValueError(f"features {spec!r} is unknown; use pca (offline) or dinov2[:<hub id>]")


# --- stored features: computed once per dataset and settings, shard by shard -------------------


class Features:
    """Committed features of a dataset: one (rows, dim) float32 array per data shard."""

    def __init__(self, store: Store, folder: str):
        self.store, self.folder = store, folder
        self.manifest = check_format(store.manifest(folder), FEATURES_FORMAT, f"{store.url}/{folder}/MANIFEST.json")
        where = f"{store.url}/{folder}/MANIFEST.json (shards)"
        self.names: list[str] = [safe_relpath(name, where) for name in self.manifest["shards"]]

    @property
    def num_shards(self) -> int:
        return len(self.names)

    def read(self, index: int, with_ids: bool = False):
        """Shard ``index``'s features (rows, dim), and with ``with_ids`` the samples' ids too."""
        arrays = load_safetensors(self.store.read_checked(self.folder, self.names[index], self.manifest))
        return (arrays["features"], arrays["ids"]) if with_ids else arrays["features"]

    def __iter__(self):
        for i in range(self.num_shards):
            yield i, self.read(i)


def feature_settings(cfg, data_id: str) -> dict:
    """What the features depend on: the dataset version, the extractor and its settings."""
    if cfg.features == "pca":
        extra = {"pca_dim": cfg.pca_dim, "pca_fit_samples": cfg.pca_fit_samples, "seed": cfg.seed}
    else:
        extra = {"seed": cfg.seed} if cfg.features.endswith(":random") else {}
    return {"dataset_sha256": data_id, "features": cfg.features, **extra}


def stored_features(cfg, store: Store, dataset: Dataset, data_id: str, address: str | None = None) -> Features:
    """The dataset's features under ``cfg``'s extractor: the committed ones if a partitioning (any
    K, any balance) computed them before, else computed now, one committed file per data shard (a
    killed run's committed files are kept) and committed by a manifest written last."""
    settings = feature_settings(cfg, data_id)
    name = cfg.features.split(":", 1)[0]
    folder = features_dir(name, settings)
    if store.is_committed(folder):
        log.info("reusing the stored features %s/%s (%s)", store.url, folder, cfg.features)
        return Features(store, folder)
    with holding(store, folder, "ddm partition: features") as (writes, token):
        if writes.is_committed(folder):
            return Features(writes, folder)
        t0 = time.perf_counter()
        extractor = build_extractor(cfg.features, cfg.pca_dim, cfg.pca_fit_samples, cfg.seed, cfg.embed_batch_size)
        extractor.fit(dataset)
        if extractor.neural:  # fails here, with its message, if the package or the weights are missing
            extractor.load().model = None  # each worker loads its own
        state = save_safetensors(extractor.state()) if extractor.state() else b""
        plan = {**settings, "state_sha256": hashlib.sha256(state).hexdigest(), "shards": dataset.shard_names}
        commits = ShardCommits(writes, folder)
        done = commits.start(plan)
        units = [{"index": i, "name": n} for i, n in enumerate(dataset.shard_names) if i not in done]
        runner = choose_runner(cfg, extractor.neural, address, store)
        url = worker_url(store, runner)
        log.info(
            "features %s of %d shards (%d to do) on %s -> %s/%s",
            cfg.features,
            dataset.num_shards,
            len(units),
            "Ray Data" if runner == "ray" else "this process",
            store.url,
            folder,
        )
        read = Stage("read", lambda: ReadDataShard(url))
        embed = lambda: Embed(extractor)  # noqa: E731 - the stage builds it where it runs
        write = Stage("write", lambda: WriteFeatures(url, folder, token))
        with connected(runner, address):
            if extractor.neural:
                stage = model_stage("embed", embed, runner, cfg.embed_actors, cfg.actors_per_gpu)
            else:
                stage = Stage("embed", embed, concurrency=cfg.workers or None)
            records = {r["index"]: r for r in run_units(units, [read, stage, write], runner, "features")}
        records.update(done)
        files = {EXTRACTOR_STATE: writes.write_hashed(f"{folder}/{EXTRACTOR_STATE}", state)} if state else {}
        ordered = [records[i] for i in range(dataset.num_shards)]
        meta = {
            "kind": "ddm.features",
            "format_version": FEATURES_FORMAT,
            "ddm_version": __version__,
            **settings,
            "extractor": extractor.name,
            # which hub weights, at which commit (in the meta, not the settings: folder ids stay)
            "extractor_weights": _weights(extractor),
            "dim": ordered[0]["dim"],
            "shards": [f"part-{i:05d}.safetensors" for i in range(dataset.num_shards)],
            "shard_rows": [r["rows"] for r in ordered],
            "seconds": time.perf_counter() - t0,
        }
        commits.finish([*ordered, {"files": files}], meta)
        return Features(writes, folder)


def choose_runner(cfg, neural: bool, address: str | None, store: Store) -> str:
    """auto: Ray Data for a network (DINOv2) or with a cluster address; PCA, or a store in this
    process's memory, in this process (a matrix product per shard streams at memory speed)."""
    if cfg.runner != "auto":
        return cfg.runner
    return "ray" if (neural or address) and store.protocol != "memory" else "local"


class ReadDataShard:
    """One data shard, verified against the dataset's manifest."""

    def __init__(self, url: str):
        self.dataset = Dataset(Store(url))

    def __call__(self, unit: dict) -> dict:
        shard = self.dataset.read_shard(unit["index"])
        return {"index": unit["index"], "ids": shard.ids, "arrays": np.ascontiguousarray(shard.arrays)}


class Embed:
    """A shard's arrays -> features (a CPU task for PCA; an actor, which loads the network once, for DINOv2)."""

    def __init__(self, extractor):
        self.extractor = extractor.load() if extractor.neural else extractor

    def __call__(self, part: dict) -> dict:
        arrays = part.pop("arrays")
        dtype = "uint8" if arrays.dtype == np.uint8 else str(arrays.dtype)
        part["features"] = np.ascontiguousarray(self.extractor(arrays, dtype), dtype=np.float32)
        return part


class WriteFeatures:
    """Commit one shard's features (and its samples' ids) on its own."""

    def __init__(self, url: str, folder: str, token):
        self.commits = ShardCommits(fenced(Store(url), token), folder)

    def __call__(self, part: dict) -> dict:
        feats = part["features"]
        name = f"part-{part['index']:05d}.safetensors"
        record = {"rows": len(feats), "dim": int(feats.shape[1])}
        data = save_safetensors({"features": feats, "ids": np.ascontiguousarray(part["ids"], dtype=np.int64)})
        return self.commits.commit(part["index"], {name: data}, record)


def _weights(extractor) -> dict | None:
    """The hub id and revision a network extractor loads (``ddm.data.encoders.hub_model``)."""
    if extractor.name != "dinov2":
        return None
    from ddm.data.encoders import DEFAULT_DINOV2, hub_model  # torch and transformers: only for DINOv2

    model, revision = hub_model(extractor.spec, DEFAULT_DINOV2)
    return {"model": model, "revision": revision}
