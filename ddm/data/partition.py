"""``ddm partition``: features -> two-stage k-means -> K partitions, written to the store.

As in the paper: many fine centroids (paper: 1024) are fitted on the features, then merged into K
coarse clusters by a weighted k-means over the fine centroids (weights = fine cluster sizes). With
``balance`` the merge respects a capacity of (1 + tolerance) * N / K samples per partition, so no
expert gets a tiny or a huge share. A sample belongs to the coarse cluster of its nearest fine
centroid.

Features once, K many times: the features are computed shard by shard (a Ray Data pipeline for
DINOv2, whose actors take GPUs when the cluster has them, and for anything with ``--address`` or
``runner=ray``; PCA otherwise in this process) and stored under ``features/`` with their extractor
and settings (``ddm.data.features.stored_features``). Another K or balance on the same dataset
reuses them: ``ddm partition --dry-run`` compares settings at the cost of the k-means alone. A
killed feature pass redoes only the shards it had not committed.

Memory does not grow with the dataset: the fine k-means is fitted with mini-batches streamed over
the stored features (``fine_epochs`` passes), and the assignment is a map over their shards (Ray
Data with ``runner=ray``). Only the fine centroids, their counts and one shard at a time are in
memory. Same data, config and seed give the same partitions, whichever runner.

Outputs under ``partitions/`` (committed by MANIFEST.json, written last):
  assignments.parquet   id, shard, row, fine, partition
  centroids.safetensors fine, coarse, fine_to_coarse, fine_counts (+ the extractor's state)
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ddm import __version__
from ddm.core.config import to_dict
from ddm.core.logs import progress
from ddm.data.config import PARTITION_EXECUTION as EXECUTION
from ddm.data.config import PartitionConfig
from ddm.data.features import EXTRACTOR_STATE, Features, stored_features
from ddm.data.pipeline import Stage, connected, run_units, worker_url
from ddm.data.shards import PARTITIONS_FORMAT, Dataset, partitions_manifest, write_parquet_bytes
from ddm.store import Store
from ddm.store.layout import ASSIGNMENTS, CENTROIDS, DATA_DIR, PARTITIONS_DIR
from ddm.store.lease import holding

log = logging.getLogger("ddm.partition")


def _batches(features: Features, batch_size: int, desc: str):
    """Stored feature arrays in batches of at most ``batch_size``, shard by shard."""
    for i in progress(range(features.num_shards), desc=desc, unit="shard", leave=False, mininterval=1.0):
        feats = features.read(i)
        for start in range(0, len(feats), batch_size):
            yield feats[start : start + batch_size]


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    d = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
    return d.argmin(1)


def merge_fine(fine: np.ndarray, counts: np.ndarray, k: int, cfg: PartitionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means of fine centroids into k coarse ones; returns (coarse, fine_to_coarse)."""
    from sklearn.cluster import KMeans  # scikit-learn takes 1.5 s to import: only where k-means runs

    used = counts > 0
    km = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit(fine[used], sample_weight=counts[used])
    coarse = km.cluster_centers_.astype(np.float32)
    mapping = _nearest(fine, coarse)
    if cfg.balance:
        coarse, mapping = _balanced(fine, counts, coarse, cfg.balance_tolerance)
    return coarse, mapping


def _balanced(fine: np.ndarray, counts: np.ndarray, coarse: np.ndarray, tol: float, iters: int = 10):
    """Capacity-constrained assignment of fine clusters to coarse ones, refined Lloyd-style.

    Each round assigns fine clusters greedily in order of distance (closest pairs first) to a coarse
    cluster with room left under the cap; coarse centroids then move to the weighted mean of what
    they received. Fine clusters are indivisible, so sizes can exceed the cap by at most one fine
    cluster when nothing else fits.
    """
    k = len(coarse)
    cap = (1 + tol) * counts.sum() / k
    for _ in range(iters):
        d = ((fine[:, None, :] - coarse[None]) ** 2).sum(-1)  # (F, K)
        order = np.argsort(d, axis=None, kind="stable")
        mapping = np.full(len(fine), -1)
        load = np.zeros(k)
        for flat in order:
            f, c = divmod(int(flat), k)
            if mapping[f] >= 0 or counts[f] == 0:
                continue
            if load[c] + counts[f] <= cap:
                mapping[f] = c
                load[c] += counts[f]
        for f in np.where((mapping < 0) & (counts > 0))[0]:  # nothing had room: the least loaded takes it
            c = int(load.argmin())
            mapping[f], load[c] = c, load[c] + counts[f]
        empty = counts == 0
        mapping[empty] = _nearest(fine[empty], coarse) if empty.any() else mapping[empty]
        new = np.stack(
            [
                np.average(fine[mapping == c], axis=0, weights=counts[mapping == c]) if load[c] > 0 else coarse[c]
                for c in range(k)
            ]
        ).astype(np.float32)
        if np.allclose(new, coarse):
            break
        coarse = new
    return coarse, mapping


def partition(cfg: PartitionConfig, store: Store, address: str | None = None, dry_run: bool = False) -> dict:
    """Partition the store's committed dataset into cfg.num_partitions; returns the manifest.

    Re-running with the same config on committed partitions does nothing; a different config is
    an error (partitions define the experts: they are never overwritten in place). One partition
    writes at a time: it holds the lease on partitions/ (``ddm.store.lease``). ``dry_run``: compute and
    return the partitions' sizes without writing them (features are stored, so trying several K
    costs one feature pass). ``address``: the Ray cluster for ``runner=ray``.
    """
    dataset = Dataset(store)
    # The partitions belong to this exact dataset version: its manifest's hash identifies it.
    data_id = hashlib.sha256(store.read_bytes(f"{DATA_DIR}/MANIFEST.json")).hexdigest()
    if dry_run:
        return _partition(cfg, store, dataset, data_id, address, commit=False)
    done = _partitioned(cfg, store, data_id)
    if done is not None:
        return done
    with holding(store, PARTITIONS_DIR, "ddm partition") as (writes, _):
        return _partitioned(cfg, writes, data_id) or _partition(cfg, writes, dataset, data_id, address)


def _partitioned(cfg: PartitionConfig, store: Store, data_id: str) -> dict | None:
    """The committed partitions' manifest if made with ``cfg`` from this dataset; None if there are none."""
    if not store.is_committed(PARTITIONS_DIR):
        return None
    manifest = partitions_manifest(store)
    made = {
        **PartitionConfig().identity(),
        **{k: v for k, v in manifest.get("config", {}).items() if k not in EXECUTION},
    }
    if made == cfg.identity() and manifest.get("dataset_sha256") == data_id:
        log.info("partitions already committed in %s/%s; nothing to do", store.url, PARTITIONS_DIR)
        return manifest
    raise ValueError(
        f"{store.url}/{PARTITIONS_DIR} already holds partitions made with a different config or dataset "
        f"(K={manifest.get('num_partitions')}); experts are trained on them, so they are not overwritten: "
        "use a new store root (`ddm partition --dry-run` compares settings without writing)"
    )


def _partition(
    cfg: PartitionConfig, store: Store, dataset: Dataset, data_id: str, address: str | None, commit: bool = True
) -> dict:
    n, k = dataset.num_samples, cfg.num_partitions
    if k > n:
        raise ValueError(f"num_partitions={k} exceeds the {n} samples in the dataset")
    num_fine = max(k, min(cfg.num_fine, n // 4))
    if num_fine != cfg.num_fine:
        log.info("using %d fine centroids (num_fine=%d capped at num_samples/4)", num_fine, cfg.num_fine)
    t0 = time.perf_counter()

    features = stored_features(cfg, store, dataset, data_id, address)
    log.info("fine k-means with %d centroids over %d samples in %d shards", num_fine, n, dataset.num_shards)

    # Stage 1: fine centroids, mini-batch k-means streamed over the stored features. The first
    # partial_fit needs at least a few samples per centroid to initialise, so the start is buffered.
    from sklearn.cluster import MiniBatchKMeans

    fine_km = MiniBatchKMeans(n_clusters=num_fine, random_state=cfg.seed, n_init=1, batch_size=cfg.batch_size)
    pending, fitted = [], False
    for epoch in range(cfg.fine_epochs):
        for feats in _batches(features, cfg.batch_size, f"fine k-means {epoch + 1}/{cfg.fine_epochs}"):
            if fitted:
                fine_km.partial_fit(feats)
                continue
            pending.append(feats)
            if sum(len(p) for p in pending) >= min(3 * num_fine, n):
                fine_km.partial_fit(np.concatenate(pending))
                pending, fitted = [], True
        if not fitted and pending:
            fine_km.partial_fit(np.concatenate(pending))
            pending, fitted = [], True
    fine = fine_km.cluster_centers_.astype(np.float32)

    # Stage 2: each sample's fine cluster (a map over the feature shards), their sizes, then the
    # merge into K coarse clusters.
    runner = cfg.runner if cfg.runner != "auto" else ("ray" if address and store.protocol != "memory" else "local")
    url = worker_url(store, runner)
    units = [{"index": i} for i in range(features.num_shards)]
    with connected(runner, address):
        step = Stage("assign", lambda: Nearest(url, features.folder, fine), concurrency=cfg.workers or None)
        nearest, ids = {}, {}
        for r in run_units(units, [step], runner, "assign"):
            nearest[r["index"]], ids[r["index"]] = np.asarray(r["fine"], np.int32), np.asarray(r["ids"], np.int64)
    fine_of = [nearest[i] for i in range(features.num_shards)]
    fine_counts = np.bincount(np.concatenate(fine_of), minlength=num_fine).astype(np.int64)
    if (fine_counts > 0).sum() < k:
        raise ValueError(
            f"the data has only {(fine_counts > 0).sum()} distinct feature clusters; cannot make {k} partitions"
        )
    coarse, fine_to_coarse = merge_fine(fine, fine_counts, k, cfg)
    counts = np.bincount(fine_to_coarse, weights=fine_counts, minlength=k).astype(np.int64)
    part_of = [fine_to_coarse[f] for f in fine_of]
    if cfg.method == "random":  # sample i of a seeded permutation goes to partition i mod K
        order = np.random.default_rng(cfg.seed).permutation(n)
        flat = np.empty(n, np.int64)
        flat[order] = np.arange(n) % k
        part_of = np.split(flat, np.cumsum([len(f) for f in fine_of])[:-1])
        counts = np.bincount(flat, minlength=k).astype(np.int64)
    if (counts == 0).any():
        raise ValueError(f"partitions {np.where(counts == 0)[0].tolist()} came out empty; lower num_partitions")
    meta = {
        "kind": "ddm.partitions",
        "format_version": PARTITIONS_FORMAT,
        "ddm_version": __version__,
        "num_partitions": k,
        "num_samples": n,
        "counts": counts.tolist(),
        "num_fine": num_fine,
        "features": cfg.features,
        "method": cfg.method,
        "features_dir": features.folder,
        "config": to_dict(cfg),
        "dataset_sha256": data_id,
        "max_over_mean": float(counts.max() / (n / k)),
    }
    if not commit:
        log.info(
            "dry run: %d partitions of sizes %s (largest / mean = %.2f)", k, counts.tolist(), meta["max_over_mean"]
        )
        return {**meta, "seconds": time.perf_counter() - t0, "dry_run": True}

    # Stage 3: the assignments, shard by shard in dataset order.
    cols = {
        "id": np.concatenate([ids[i] for i in range(features.num_shards)]),
        "shard": np.concatenate([np.full(len(f), i, np.int32) for i, f in enumerate(fine_of)]),
        "row": np.concatenate([np.arange(len(f), dtype=np.int32) for f in fine_of]),
        "fine": np.concatenate(fine_of),
        "partition": np.concatenate(part_of).astype(np.int32),
    }
    table = pa.table(cols)
    state = (
        load_safetensors(store.read_verified(features.folder, EXTRACTOR_STATE))
        if EXTRACTOR_STATE in features.manifest["files"]
        else {}
    )
    known = {
        ASSIGNMENTS: store.write_hashed(f"{PARTITIONS_DIR}/{ASSIGNMENTS}", write_parquet_bytes(table)),
        CENTROIDS: store.write_hashed(
            f"{PARTITIONS_DIR}/{CENTROIDS}",
            save_safetensors(
                {
                    "fine": fine,
                    "coarse": coarse,
                    "fine_to_coarse": fine_to_coarse.astype(np.int32),
                    "fine_counts": fine_counts,
                    **state,
                }
            ),
        ),
    }
    manifest = store.commit(
        PARTITIONS_DIR, list(known), meta={**meta, "seconds": time.perf_counter() - t0}, known=known
    )
    log.info("%d partitions of sizes %s (largest / mean = %.2f)", k, counts.tolist(), meta["max_over_mean"])
    return manifest


class Nearest:
    """Each sample's nearest fine centroid, for one stored feature shard (a Ray task or this process)."""

    def __init__(self, url: str, folder: str, fine: np.ndarray):
        self.features, self.fine = Features(Store(url), folder), fine

    def __call__(self, unit: dict) -> dict:
        feats, ids = self.features.read(unit["index"], with_ids=True)
        return {"index": unit["index"], "fine": _nearest(feats, self.fine).tolist(), "ids": ids.tolist()}
