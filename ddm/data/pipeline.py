"""Shard-parallel data work: ingest, features and assignments as Ray Data pipelines, or in-process.

Work is cut into *units*, one per output shard, each a small JSON-able dict that says where its
inputs are. A unit flows through stages (e.g. read + decode + resize on CPU tasks, encode on an
actor pool that takes GPUs, write), and its last stage commits it on its own (``ShardCommits``):
the output file first, then a progress record next to it. The work's plan (what is made from what)
is written before any unit; a re-run with the same plan reads the records and redoes only the
units without one, so a crash at hour five costs the shards in flight, not five hours. The
directory's MANIFEST.json is written last, from the records.

Runners: ``ray`` runs the stages as a Ray Data pipeline on the Ray cluster this process is connected
to (or a local Ray runtime it starts), streaming: a unit's arrays live in the object store between
stages, and only a bounded number are in flight, so memory per worker is bounded by a shard whatever
the dataset size. Ray retries a unit whose worker died. ``local`` runs the same stages in this
process, one unit after another (tiny data, no Ray start). Both give the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ddm.core.logs import progress
from ddm.distributed.ray_runtime import ray_cluster
from ddm.store import Store, absolute_url
from ddm.store.layout import SHARDS_DIR, UnsafeName, check_digest, safe_relpath

log = logging.getLogger("ddm.data")

PROGRESS_DIR = "progress"
PLAN_FILE = "plan.json"
RECORD_RE = re.compile(r"^(\d{5,})\.json$")  # progress/<index>.json: the only names read as records
TEMP_PREFIX = ".tmp-"
RUNNERS = ("auto", "ray", "local")


@dataclass(frozen=True)
class Stage:
    """One step a unit goes through.

    ``make`` builds the step's callable (once per worker, or once per actor for a pool): a
    callable class that loads a network goes on an actor pool of ``actors`` actors, each with
    ``num_gpus``; a plain step runs as Ray tasks of ``num_cpus``, at most ``concurrency`` in
    flight (None: as many as the cluster has room for).
    """

    name: str
    make: Callable[[], Callable[[dict], dict]]
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    actors: int = 0  # > 0: an actor pool of this size (for steps that load a model)
    concurrency: int | None = None


def check_runner(runner: str) -> None:
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is unknown; use auto, ray (Ray Data) or local (this process)")


def worker_url(store: Store, runner: str) -> str:
    """The store's URL as Ray workers must see it: absolute (their working directory is not this
    process's); a ``memory://`` store lives in this process only, so Ray cannot be its runner."""
    if runner == "ray" and store.protocol == "memory":
        raise ValueError(
            f"store {store.url} lives in this process's memory, where Ray workers cannot reach it; use runner=local "
            "or a file or S3 store"
        )
    return absolute_url(store.url)


def model_stage(
    name: str, make: Callable, runner: str, actors: int, actors_per_gpu: int, pools: int = 1, gpus: float | None = None
) -> Stage:
    """A stage that runs a network: on Ray an actor pool (``actors``, or ``actors_per_gpu`` per GPU of
    the connected cluster (``gpus``: its count, read from Ray when None), or 1 on CPU), each actor
    holding 1/``actors_per_gpu`` of a GPU when the cluster has GPUs; in this process, one copy.
    ``pools``: the network stages of one pipeline (the VAE and the caption encoder): each actor then
    holds 1/``pools`` of its share, so every pool starts at once on the same GPUs (an actor pool
    waits for all its actors: two pools each asking for every GPU would wait for ever)."""
    if runner == "local":
        return Stage(name, make)
    if gpus is None:
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0.0))
    return Stage(
        name,
        make,
        num_gpus=1.0 / (actors_per_gpu * pools) if gpus else 0.0,
        actors=actors or (max(1, int(gpus) * actors_per_gpu) if gpus else 1),
    )


@contextlib.contextmanager
def connected(runner: str, address: str | None) -> Iterator[None]:
    """Connected to Ray for the block when ``runner`` is ``ray`` (a runtime this opened is closed at
    the end); nothing otherwise."""
    if runner != "ray":
        yield
        return
    with ray_cluster(address, log_to_driver=False):
        yield


def run_units(units: list[dict], stages: list[Stage], runner: str, desc: str) -> Iterator[dict]:
    """Each unit through ``stages``; yields the last stage's records as units finish (any order)."""
    if not units:
        return
    if runner == "local":
        steps = [s.make() for s in stages]
        for unit in progress(units, desc=desc, unit="shard", mininterval=1.0):
            for step in steps:
                unit = step(unit)
            yield unit
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.verbose_stats_logs, ctx.op_resource_reservation_enabled)
    ctx.enable_progress_bars = False  # ours counts shards; Ray's per-operator bars would interleave with it
    ctx.verbose_stats_logs = False
    # Ray Data reserves part of the cluster for each operator; with one task operator that left a
    # CPU idle much of the time (measured on 2 CPUs: 8 half-second units took 3.1 s instead of 2.2 s).
    # Pipelines with an actor pool keep the reservation, so neither the pool nor the tasks starve.
    ctx.op_resource_reservation_enabled = any(s.actors for s in stages)
    try:
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in units], override_num_blocks=len(units))
        fused = _fused(stages)
        for i, s in enumerate(fused):
            fn = _RowStep(s.make, i == 0, i == len(fused) - 1)
            if s.actors > 0:
                pool = ray.data.ActorPoolStrategy(size=s.actors)
                ds = ds.map(
                    _ActorStep, fn_constructor_args=(fn,), compute=pool, num_cpus=s.num_cpus, num_gpus=s.num_gpus
                )
            else:
                ds = ds.map(fn, compute=ray.data.TaskPoolStrategy(size=s.concurrency), num_cpus=s.num_cpus)
        for row in progress(ds.iter_rows(), total=len(units), desc=desc, unit="shard", mininterval=1.0):
            yield json.loads(row["record"])
    finally:
        ctx.enable_progress_bars, ctx.verbose_stats_logs, ctx.op_resource_reservation_enabled = saved


def _fused(stages: list[Stage]) -> list[Stage]:
    """Consecutive task stages as one task (a unit's arrays stay in its worker's memory from read to
    write); actor stages stay apart. A fused stage keeps the first one's concurrency and the most CPUs."""
    out: list[Stage] = []
    for s in stages:
        if out and not s.actors and not out[-1].actors:
            prev = out[-1]
            out[-1] = Stage(
                f"{prev.name}+{s.name}",
                functools.partial(_compose, prev.make, s.make),
                num_cpus=max(prev.num_cpus, s.num_cpus),
                concurrency=prev.concurrency or s.concurrency,
            )
        else:
            out.append(s)
    return out


def _compose(*makes: Callable) -> Callable[[dict], dict]:
    steps = [m() for m in makes]

    def run(item: dict) -> dict:
        for step in steps:
            item = step(item)
        return item

    return run


class _RowStep:
    """A stage's callable on Ray Data rows: the first stage reads the unit from its JSON, the last
    returns its record as JSON; arrays in between travel as Ray Data tensor columns."""

    def __init__(self, make: Callable, first: bool, last: bool):
        self.make, self.first, self.last = make, first, last
        self.step: Callable | None = None

    def __call__(self, row: dict) -> dict:
        if self.step is None:
            self.step = self.make()
        item = json.loads(row["unit"]) if self.first else _from_row(row)
        out = self.step(item)
        return {"record": json.dumps(out)} if self.last else _to_row(out)


class _ActorStep:
    def __init__(self, fn: _RowStep):
        self.fn = fn
        self.fn.step = fn.make()  # the model loads when the actor starts, not at its first unit

    def __call__(self, row: dict) -> dict:
        return self.fn(row)


def _to_row(item: dict) -> dict:
    """Arrays stay arrays (Ray Data tensors); everything else travels as one JSON column."""
    import numpy as np

    arrays = {k: v for k, v in item.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in item.items() if k not in arrays}
    return {**{f"a_{k}": v for k, v in arrays.items()}, "meta": json.dumps(rest)}


def _from_row(row: dict) -> dict:
    import numpy as np

    item = json.loads(row["meta"])
    item.update({k[2:]: np.asarray(v) for k, v in row.items() if k.startswith("a_")})
    return item


# --- per-shard commits ------------------------------------------------------------------------


class ShardCommits:
    """Units committed one by one under ``folder`` of ``store``, then the folder by its manifest.

    ``start(plan)`` writes ``folder/plan.json`` (or finds the same plan there from a crashed run and
    returns the records of the units it committed; a different plan's leftovers are removed).
    Workers call ``commit(index, files, record)``: the files are written, then the record
    ``progress/<index>.json`` with their sizes and sha256 (the record is the unit's commit). The
    driver's ``finish(meta)`` writes the manifest from the records and removes the progress folder.
    Only ``progress/<index>.json`` names are read as records (never a killed write's ``.tmp-*`` file,
    whatever its name ends with); ``start`` and ``finish`` delete the temporary files that killed
    writers left (``remove_stale_temporaries``: old ones only, so a live writer's stays).
    """

    def __init__(self, store: Store, folder: str):
        self.store, self.folder = store, folder

    def record_name(self, index: int) -> str:
        return f"{self.folder}/{PROGRESS_DIR}/{index:05d}.json"

    def start(self, plan: dict) -> dict[int, dict]:
        store, folder = self.store, self.folder
        for sub in ("", PROGRESS_DIR, SHARDS_DIR):  # what killed writers left (ingest's shards are in shards/)
            remove_stale_temporaries(store, f"{folder}/{sub}".rstrip("/"))
        if store.exists(f"{folder}/{PLAN_FILE}"):
            old = store.read_json(f"{folder}/{PLAN_FILE}")
            if old == plan:
                done = self._committed()
                if done:
                    log.info(
                        "resuming: %d of %d units of %s/%s were committed by an earlier run; redoing the rest",
                        len(done),
                        plan["num_units"],
                        store.url,
                        folder,
                    )
                return done
            log.warning(
                "removing the uncommitted leftovers of an interrupted run with another plan in %s/%s", store.url, folder
            )
        if store.list(folder):
            store.delete(folder, recursive=True)
        store.write_json(f"{folder}/{PLAN_FILE}", plan)
        return {}

    def _committed(self) -> dict[int, dict]:
        """Records whose files are all present at the recorded size (a unit whose files went missing
        is redone). Only ``<index>.json`` names are records: a killed writer's temporary file
        (``.tmp-*``) is never read, and a record that does not parse or does not fit its name is
        not trusted (its unit is redone)."""
        done = {}
        where = f"{self.store.url}/{self.folder}/{PROGRESS_DIR}"
        for name in self.store.list(f"{self.folder}/{PROGRESS_DIR}"):
            m = RECORD_RE.match(name)
            if not m:
                continue
            try:
                rec = self.store.read_json(f"{self.folder}/{PROGRESS_DIR}/{name}")
                ok = (
                    isinstance(rec, dict)
                    and rec.get("index") == int(m.group(1))
                    and isinstance(rec.get("files"), dict)
                    and all(_entry_ok(f, e) for f, e in rec["files"].items())
                )
            except ValueError:  # not JSON (cut short where the backend's writes are not atomic)
                ok = False
            if not ok:
                log.warning(
                    "ignoring the progress record %s/%s (unreadable or not a record); redoing its unit", where, name
                )
                continue
            files = rec["files"]
            if all(
                self.store.exists(f"{self.folder}/{f}") and self.store.size(f"{self.folder}/{f}") == e["size"]
                for f, e in files.items()
            ):
                done[int(rec["index"])] = rec
        return done

    def commit(self, index: int, files: dict[str, bytes], record: dict) -> dict:
        known = {name: self.store.write_hashed(f"{self.folder}/{name}", data) for name, data in files.items()}
        record = {**record, "index": index, "files": known}
        self.store.write_json(self.record_name(index), record)
        return record

    def finish(self, records: Iterable[dict], meta: dict) -> dict:
        known = {name: entry for rec in records for name, entry in rec["files"].items()}
        manifest = self.store.commit(self.folder, sorted(known), meta=meta, known=known)
        with contextlib.suppress(Exception):  # tidy-up only: the manifest does not list them
            self.store.delete(f"{self.folder}/{PROGRESS_DIR}", recursive=True)
            self.store.delete(f"{self.folder}/{PLAN_FILE}")
            for sub in ("", SHARDS_DIR):
                remove_stale_temporaries(self.store, f"{self.folder}/{sub}".rstrip("/"))
        return manifest


def _entry_ok(name: object, entry: object) -> bool:
    """A progress record's file entry: a relative name below its folder, {size, sha256}."""
    try:
        safe_relpath(name, "a progress record")
        check_digest(entry.get("sha256") if isinstance(entry, dict) else None, "a progress record")
    except UnsafeName:
        return False
    return isinstance(entry.get("size"), int)


def is_temporary(name: str) -> bool:
    """A store's temporary file (``ddm.store.store`` writes ``.tmp-<uuid>-<name>`` locally, then renames it):
    never data, whatever its name ends with."""
    return name.startswith(TEMP_PREFIX)


def remove_stale_temporaries(store: Store, folder: str, max_age_s: float | None = None) -> int:
    """Delete the temporary files (``.tmp-*``) directly in ``folder`` that were last written more than
    ``max_age_s`` ago (``DDM_STALE_TMP_S``, 10 minutes by default): what writers killed mid-write left.
    A live writer's file is younger (each write updates its time), so it is left alone. Only local
    stores make temporary files (S3 and others publish in one call). Returns how many were removed."""
    if store.protocol != "file":
        return 0
    if max_age_s is None:
        max_age_s = float(os.environ.get("DDM_STALE_TMP_S", 600))
    root = store.path(folder)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    now, removed = time.time(), 0
    for e in entries:
        if not is_temporary(e.name):
            continue
        with contextlib.suppress(FileNotFoundError):  # its writer may have just renamed or removed it
            if e.is_file(follow_symlinks=False) and now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                if store.fence is not None:  # a writer that lost its lease deletes nothing either
                    store.fence(f"delete {store.url}/{folder}/{e.name}")
                os.unlink(e.path)
                removed += 1
    if removed:
        log.info("removed %d stale temporary files (left by killed writes) in %s/%s", removed, store.url, folder)
    return removed


def even_units(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive units of ``size`` items covering ``n``."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]
