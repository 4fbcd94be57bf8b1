"""Expert jobs across islands: ``ddm submit``, ``ddm status``, ``ddm resume``.

An island is a Ray cluster reached through its job server (the Ray Jobs API). ``ddm submit``
assigns each expert to an island, submits one Ray job per expert (``ddm train expert`` on that
island, which runs Ray Train + DeepSpeed there) and then the router job; the islands share
nothing but the store. Everything needed to follow and resume the run lives in the store under
``islands/``: the plan (which job runs where, with which config) and, per job, its latest
submission. Submission ids are deterministic (``ddm-<run id>-<job>-<attempt>``), so submitting
again never starts a second copy of a job that is pending or running.

Assignment: partitions named in ``assignment`` go to their island; the others are placed largest
first on the island with the least work per unit of ``capacity`` (work = partition size x steps).
Steps: ``steps_policy: fixed`` (the default) trains every expert for the spec's ``expert.steps``,
as the paper does; ``proportional`` scales them by partition size (steps x n_k / mean n, at least
1), so each expert sees its data about equally often. An island's ``overrides`` (workers, GPUs,
steps, ...) apply last, to every job it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ddm.config import from_dict, to_dict
from ddm.train.expert import TrainConfig, config_changes, is_finished

log = logging.getLogger("ddm.submit")

PLAN_DIR = "islands"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ACTIVE = ("PENDING", "RUNNING")


@dataclass(frozen=True)
class Island:
    """One Ray cluster: where its job server is and how jobs run there."""

    address: str  # the Ray job server (dashboard) URL, e.g. http://head-node:8265
    capacity: float = 1.0  # relative capacity for balanced assignment (e.g. its number of GPU nodes)
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields for every job here
    ddm_command: str = "ddm"  # how the island's image runs ddm
    runtime_env: dict[str, Any] = field(default_factory=dict)  # extra Ray runtime_env (container, pip, ...)
    auth_token_env: str = ""  # NAME of the variable holding this island's Ray token (empty: Ray's own lookup)

    def __post_init__(self) -> None:
        if self.auth_token_env and not ENV_NAME_RE.match(self.auth_token_env):
            raise ValueError(f"auth_token_env names the variable that holds the token, got {self.auth_token_env!r}; never the token itself")
        if not re.match(r"^(https?|ray)://[^/\s]+", self.address):
            raise ValueError(f"island address {self.address!r} must be the job server's URL, e.g. http://head-node:8265")
        if self.capacity <= 0:
            raise ValueError(f"island capacity must be > 0, got {self.capacity}")
        bad = sorted(set(self.overrides) & {"store", "job", "partition", "teacher"})
        if bad:
            raise ValueError(f"island overrides may not set {bad}: the plan sets them")


@dataclass(frozen=True)
class IslandsConfig:
    """The islands file: the store, the islands, what environment to forward, how to assign."""

    store: str
    islands: dict[str, Island]
    env: list[str] = field(default_factory=list)  # NAMES of variables forwarded to every job; values come from the submitting shell
    assignment: dict[int, str] = field(default_factory=dict)  # partition -> island; the rest are balanced
    router_island: str = ""  # empty: the island with the largest capacity
    steps_policy: str = "fixed"  # fixed | proportional (to partition size)

    def __post_init__(self) -> None:
        if not self.store:
            raise ValueError("islands file: store is empty; give the run's store URL (e.g. s3://bucket/run)")
        if not self.islands:
            raise ValueError("islands file: no islands; add at least one under islands:")
        for name in self.islands:
            if not NAME_RE.match(name):
                raise ValueError(f"island name {name!r} must be letters, digits, '-' or '_'")
        for name in self.env:
            if not ENV_NAME_RE.match(name):
                raise ValueError(
                    f"env lists variable names to forward, got {name!r}; put the value in the submitting shell's "
                    "environment, never in the islands file"
                )
        for part, island in self.assignment.items():
            if island not in self.islands:
                raise ValueError(f"assignment: partition {part} -> unknown island {island!r}; islands are {sorted(self.islands)}")
        if self.router_island and self.router_island not in self.islands:
            raise ValueError(f"router_island {self.router_island!r} is not one of the islands {sorted(self.islands)}")
        if self.steps_policy not in ("fixed", "proportional"):
            raise ValueError(f"steps_policy must be fixed or proportional, got {self.steps_policy!r}")


def load_islands(path: str, overrides: list[str] | None = None) -> IslandsConfig:
    from ddm.config import load

    return load(IslandsConfig, path, overrides)


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class PlannedJob:
    name: str  # expert-00 ... / router
    island: str
    config: TrainConfig

    @property
    def kind(self) -> str:
        return self.config.job


def assign(sizes: list[int], islands: IslandsConfig, steps: list[int]) -> list[str]:
    """Island of each partition: the explicit map, then largest work first onto the least loaded
    island per unit of capacity (ties to the island listed first)."""
    out: list[str | None] = [islands.assignment.get(k) for k in range(len(sizes))]
    unknown = sorted(set(islands.assignment) - set(range(len(sizes))))
    if unknown:
        raise ValueError(f"assignment names partitions {unknown}, but the store has partitions 0..{len(sizes) - 1}")
    load = {name: 0.0 for name in islands.islands}
    for k, isl in enumerate(out):
        if isl is not None:
            load[isl] += sizes[k] * steps[k]
    for k in sorted((k for k in range(len(sizes)) if out[k] is None), key=lambda k: -sizes[k] * steps[k]):
        best = min(islands.islands, key=lambda n: ((load[n] + sizes[k] * steps[k]) / islands.islands[n].capacity, list(islands.islands).index(n)))
        out[k] = best
        load[best] += sizes[k] * steps[k]
    return out  # type: ignore[return-value]


def plan_jobs(spec, islands: IslandsConfig, sizes: list[int]) -> list[PlannedJob]:
    """The experts (one per partition) and the router, each with its island and full config."""
    from ddm.pipeline import jobs

    k = len(sizes)
    steps = [spec.expert.steps] * k
    if islands.steps_policy == "proportional":
        steps = [max(1, round(spec.expert.steps * n * k / sum(sizes))) for n in sizes]
    *experts, router = jobs(dataclasses.replace(spec, store=islands.store, monolith=False), k, steps)
    where = assign(sizes, islands, steps)
    router_island = islands.router_island or max(islands.islands, key=lambda n: islands.islands[n].capacity)
    placed = [(f"expert-{p:02d}", where[p], cfg) for p, cfg in enumerate(experts)] + [("router", router_island, router)]
    return [PlannedJob(name, isl, _with_overrides(cfg, islands.islands[isl].overrides)) for name, isl, cfg in placed]


def _with_overrides(cfg: TrainConfig, overrides: dict) -> TrainConfig:
    from ddm.config import deep_merge

    return from_dict(TrainConfig, deep_merge(to_dict(cfg), overrides)) if overrides else cfg


def run_id(store_url: str) -> str:
    return hashlib.sha256(store_url.encode()).hexdigest()[:8]


def submission_id(store_url: str, job: str, attempt: int) -> str:
    return f"ddm-{run_id(store_url)}-{job}-{attempt}"


def _plan_record(jobs: list[PlannedJob], islands: IslandsConfig) -> dict:
    return {
        "kind": "ddm.islands-plan",
        "store": islands.store,
        "jobs": [{"name": j.name, "island": j.island, "run_dir": j.config.run_dir, "config": to_dict(j.config)} for j in jobs],
    }


def _check_plan_matches(old: dict, new: dict) -> None:
    """A new submission must train what the store's plan trains (islands may change)."""
    old_jobs = {j["name"]: j for j in old["jobs"]}
    new_jobs = {j["name"]: j for j in new["jobs"]}
    if set(old_jobs) != set(new_jobs):
        raise ValueError(
            f"the store's run has jobs {sorted(old_jobs)} but this spec makes {sorted(new_jobs)}; use a new store for a new run"
        )
    for name, j in new_jobs.items():
        diffs = config_changes(old_jobs[name]["config"], j["config"])
        if diffs:
            raise ValueError(f"{name} in the store's run was planned with other settings ({diffs}); use a new store for a new run")


# --- the job servers ------------------------------------------------------------------------------


class IslandError(ValueError):
    """An island that cannot be used: unreachable, wrong address, refused credentials."""


def client(name: str, island: Island):
    """A Ray Jobs client for the island, with errors that say what is wrong and where."""
    from ray.job_submission import JobSubmissionClient

    headers = None
    if island.auth_token_env:
        token = os.environ.get(island.auth_token_env)
        if not token:
            raise IslandError(f"island {name!r} reads its Ray token from ${island.auth_token_env}, which this shell does not set")
        headers = {"Authorization": f"Bearer {token}"}
    try:
        c = JobSubmissionClient(island.address, headers=headers)
        c.list_jobs()  # an authenticated call: the version probe alone may pass without credentials
        return c
    except Exception as e:  # noqa: BLE001 - the Jobs SDK raises bare ConnectionError/RuntimeError
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "uthenticat")):
            raise IslandError(
                f"island {name!r} ({island.address}) refused the request: authentication failed. In this shell set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to that cluster's token"
            ) from e
        raise IslandError(f"island {name!r} cannot be reached at {island.address} ({text.splitlines()[0][:300]})") from e


def _job_state(c, sid: str) -> str:
    try:
        st = c.get_job_status(sid)
        return str(getattr(st, "value", st))
    except Exception as e:  # noqa: BLE001
        if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
            return "LOST"  # the server does not know it (restarted cluster, wrong island)
        raise IslandError(f"job server error for {sid}: {e}") from e


def _forwarded_env(islands: IslandsConfig) -> dict[str, str]:
    missing = [n for n in islands.env if n not in os.environ]
    if missing:
        raise ValueError(f"the islands file forwards {missing}, but this shell does not set them; export them first")
    return {n: os.environ[n] for n in islands.env}


def _entrypoint(island: Island, job: PlannedJob, config_url: str) -> str:
    import shlex

    what = "router" if job.kind == "router" else "expert"
    return f"{island.ddm_command} train {what} -c {shlex.quote(config_url)}"


# --- submit / status / resume ----------------------------------------------------------------------


def _store(islands: IslandsConfig):
    from ddm.store import Store

    return Store(islands.store)


def _export_done(job: dict) -> bool:
    return is_finished(from_dict(TrainConfig, job["config"]))


def submit(spec, islands: IslandsConfig, resume_only: bool = False) -> list[dict]:
    """Plan (or check the stored plan) and submit every job that is neither done nor active.

    Islands are contacted before anything is written (a new submission: every island of the file;
    a resume: those it needs), so a wrong address or refused credentials change nothing.
    """
    from ddm.data.ingest import ingest
    from ddm.data.partition import PARTITIONS_DIR, partition
    from ddm.store import absolute_url
    from ddm.train.expert import check_inputs

    islands = dataclasses.replace(islands, store=absolute_url(islands.store))
    store = _store(islands)
    store.check_reachable()
    env = _forwarded_env(islands)
    clients: dict[str, Any] = {}
    if not resume_only:  # a new submission needs every island: contact them before the store is touched
        clients = {name: client(name, isl) for name, isl in islands.islands.items()}
    if resume_only:
        if not store.exists(f"{PLAN_DIR}/plan.json"):
            raise ValueError(f"{islands.store} has no submitted run ({PLAN_DIR}/plan.json); use `ddm submit` first")
        plan = store.read_json(f"{PLAN_DIR}/plan.json")
    else:
        if spec.store not in ("", islands.store) and absolute_url(spec.store) != islands.store:
            log.info("the islands file's store %s is used (the spec says %s)", islands.store, spec.store)
        ingest(spec.ingest, store)  # both idempotent: nothing happens when the store already holds them
        partition(spec.partition, store)
        sizes = [int(n) for n in store.manifest(PARTITIONS_DIR)["counts"]]
        jobs = plan_jobs(spec, islands, sizes)
        for j in jobs:
            check_inputs(j.config)  # data shape, partitions, and agreement with what each run dir holds
        plan = _plan_record(jobs, islands)
        if store.exists(f"{PLAN_DIR}/plan.json"):
            _check_plan_matches(store.read_json(f"{PLAN_DIR}/plan.json"), plan)
    for j in plan["jobs"]:
        if j["island"] not in islands.islands:
            raise ValueError(f"{j['name']} runs on island {j['island']!r}, which the islands file no longer lists")
    records = {j["name"]: _record(store, j["name"]) for j in plan["jobs"]}
    todo = [j for j in plan["jobs"] if not _export_done(j)]
    # Every island that gets a job, or may still run an earlier attempt of one, is contacted first.
    needed = {j["island"] for j in todo} | {records[j["name"]]["island"] for j in todo if records[j["name"]]}
    for name in sorted(needed - set(islands.islands)):
        raise ValueError(f"an earlier attempt ran on island {name!r}, which the islands file no longer lists; add it back to check that job")
    for name in sorted(needed - set(clients)):  # resume: the islands it needs, before any change
        clients[name] = client(name, islands.islands[name])
    if not resume_only:
        store.write_json(f"{PLAN_DIR}/plan.json", plan)
    submitted = []
    for j in todo:
        record_path = f"{PLAN_DIR}/jobs/{j['name']}.json"
        record = records[j["name"]]
        c = clients[j["island"]]
        if record is not None:
            state = _job_state(clients[record["island"]], record["submission_id"])
            if state in ACTIVE:  # never a second copy, not even on another island
                log.info("%s is %s on %s as %s: not submitted again", j["name"], state.lower(), record["island"], record["submission_id"])
                continue
        attempt = 0 if record is None else record["attempt"] + 1
        sid = submission_id(islands.store, j["name"], attempt)
        config_url = f"{islands.store}/{PLAN_DIR}/jobs/{j['name']}.config.json"
        store.write_json(f"{PLAN_DIR}/jobs/{j['name']}.config.json", j["config"])
        island = islands.islands[j["island"]]
        runtime_env = {**island.runtime_env, "env_vars": {**island.runtime_env.get("env_vars", {}), **env}}
        try:
            c.submit_job(
                entrypoint=_entrypoint(island, _as_planned(j), config_url),
                submission_id=sid,
                runtime_env=runtime_env,
                metadata={"ddm_job": j["name"], "ddm_run": run_id(islands.store)},
            )
        except Exception as e:  # noqa: BLE001
            if "already exists" not in str(e):
                raise IslandError(f"island {j['island']!r} did not accept {j['name']}: {e}") from e
            log.info("%s: %s already exists on %s", j["name"], sid, j["island"])  # a lost record: same id, no duplicate
        store.write_json(record_path, {"island": j["island"], "submission_id": sid, "attempt": attempt, "submitted_at": time.time()})
        log.info("submitted %s to %s as %s", j["name"], j["island"], sid)
        submitted.append({"job": j["name"], "island": j["island"], "submission_id": sid})
    return submitted


def _record(store, job: str) -> dict | None:
    path = f"{PLAN_DIR}/jobs/{job}.json"
    return store.read_json(path) if store.exists(path) else None


def _as_planned(j: dict) -> PlannedJob:
    return PlannedJob(j["name"], j["island"], from_dict(TrainConfig, j["config"]))


def status(islands: IslandsConfig) -> dict:
    """One row per job: island, state, step, newest commit, loss, throughput; and whether the
    ensemble can be (or has been) assembled."""
    from ddm.checkpoint import STEP_RE
    from ddm.store import absolute_url

    islands = dataclasses.replace(islands, store=absolute_url(islands.store))
    store = _store(islands)
    if not store.exists(f"{PLAN_DIR}/plan.json"):
        raise ValueError(f"{islands.store} has no submitted run ({PLAN_DIR}/plan.json); use `ddm submit` first")
    plan = store.read_json(f"{PLAN_DIR}/plan.json")
    clients: dict[str, Any] = {}
    errors: dict[str, str] = {}
    rows = []
    for j in plan["jobs"]:
        run = store.child(j["run_dir"])
        record_path = f"{PLAN_DIR}/jobs/{j['name']}.json"
        record = store.read_json(record_path) if store.exists(record_path) else None
        progress = run.read_json("progress.json") if run.exists("progress.json") else {}
        commits = sorted(int(m.group(1)) for n in (run.list("checkpoints") if run.exists("checkpoints") else []) if (m := STEP_RE.match(n)) and run.is_committed(f"checkpoints/{n}"))
        done = _export_done(j)
        island_name = record["island"] if record else j["island"]
        state = "NOT SUBMITTED"
        if record is not None:
            if island_name not in islands.islands:
                state = "UNKNOWN ISLAND"
            else:
                if island_name not in clients and island_name not in errors:
                    try:
                        clients[island_name] = client(island_name, islands.islands[island_name])
                    except IslandError as e:
                        errors[island_name] = str(e)
                state = "UNREACHABLE" if island_name in errors else _job_state(clients[island_name], record["submission_id"])
        rows.append({
            "job": j["name"], "island": island_name, "state": state, "done": done,
            "step": progress.get("step", 0), "steps": j["config"]["steps"],
            "checkpoint": commits[-1] if commits else None, "loss": progress.get("loss"),
            "steps_per_s": progress.get("steps_per_s"),
            "submission_id": record["submission_id"] if record else None,
        })  # fmt: skip
    ensemble = store.read_json("ensemble.json") if store.exists("ensemble.json") else None
    return {"store": islands.store, "jobs": rows, "unreachable": errors, "all_done": all(r["done"] for r in rows), "ensemble": ensemble is not None}


def format_status(s: dict) -> str:
    lines = [f"run {s['store']}", "", f"{'job':<10} {'island':<10} {'state':<14} {'step':>12} {'checkpoint':>10} {'loss':>8} {'steps/s':>8}  submission"]
    for r in s["jobs"]:
        state = "DONE" if r["done"] else r["state"]
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        sps = "" if r["steps_per_s"] is None else f"{r['steps_per_s']:.1f}"
        ckpt = "" if r["checkpoint"] is None else str(r["checkpoint"])
        lines.append(f"{r['job']:<10} {r['island']:<10} {state:<14} {r['step']:>5}/{r['steps']:<6} {ckpt:>10} {loss:>8} {sps:>8}  {r['submission_id'] or ''}")
    for name, err in s["unreachable"].items():
        lines.append(f"\nisland {name}: {err}")
    if s["all_done"]:
        lines.append("\nevery export exists: " + ("ensemble.json is assembled" if s["ensemble"] else "run `ddm resume` (or `ddm assemble`) to assemble"))
    return "\n".join(lines)


def assemble_if_complete(islands: IslandsConfig, rule: str = "top1") -> dict | None:
    """Assemble once every expert's and the router's export exists at its final step."""
    from ddm.ensemble import assemble
    from ddm.store import absolute_url

    islands = dataclasses.replace(islands, store=absolute_url(islands.store))
    store = _store(islands)
    plan = store.read_json(f"{PLAN_DIR}/plan.json")
    if not all(_export_done(j) for j in plan["jobs"]):
        return None
    return assemble(store, rule, replace=True)


def wait(islands: IslandsConfig, poll_s: float = 10.0, timeout_s: float | None = None) -> dict:
    """Poll until every job is done (or none is active any more); returns the last status."""
    t0 = time.time()
    while True:
        s = status(islands)
        active = [r for r in s["jobs"] if not r["done"] and r["state"] in ACTIVE]
        if s["all_done"] or not active:
            return s
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return s
        time.sleep(poll_s)
