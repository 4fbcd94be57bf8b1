"""The islands file and the plan of a run across islands: which job runs where, with which config.

An island is a Ray cluster reached through its job server (the Ray Jobs API). Assignment:
partitions named in ``assignment`` go to their island; the others are placed largest first on the
island with the least work per unit of ``capacity`` (work = partition size x steps). Steps:
``steps_policy: fixed`` (the default) trains every expert for the spec's ``expert.steps``, as the
paper does; ``proportional`` scales them by partition size (steps x n_k / mean n, at least 1), so
each expert sees its data about equally often. An island's ``overrides`` (workers, GPUs, steps,
...) apply last, to every job it runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ddm.core.config import deep_merge, from_dict, load, to_dict
from ddm.core.secrets import check_forwarded, looks_secret, redact_url
from ddm.launchers.spec import RunSpec, jobs
from ddm.store import Store, absolute_url, layout
from ddm.store.layout import run_id, safe_relpath
from ddm.store.urls import check_store_url
from ddm.train.job import JobConfig, config_changes

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Island:
    """One Ray cluster: where its job server is and how jobs run there."""

    address: str  # the Ray job server (dashboard) URL, e.g. http://head-node:8265
    capacity: float = 1.0  # relative capacity for balanced assignment (e.g. its number of GPU nodes)
    overrides: dict[str, Any] = field(default_factory=dict)  # JobConfig fields for every job here
    ddm_command: str = "ddm"  # how the island's image runs ddm
    runtime_env: dict[str, Any] = field(default_factory=dict)  # extra Ray runtime_env (container, pip, ...)
    auth_token_env: str = ""  # NAME of the variable holding this island's Ray token (empty: Ray's own lookup)

    def __post_init__(self) -> None:
        if self.auth_token_env and not ENV_NAME_RE.match(self.auth_token_env):
            raise ValueError(
                f"auth_token_env names the variable that holds the token, got {self.auth_token_env!r}; never the "
                "token itself"
            )
        if not re.match(r"^(https?|ray)://[^/\s]+", self.address):
            raise ValueError(
                f"island address {redact_url(self.address)!r} must be the job server's URL, e.g. http://head-node:8265"
            )
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
    env: list[str] = field(
        default_factory=list
    )  # NAMES of variables forwarded to every job; values come from the submitting shell
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
            if looks_secret(name):
                raise ValueError(
                    f"env forwards {name}, which looks like a secret: Ray keeps forwarded variables in each job's "
                    "runtime env and shows them to anyone who can reach the island's job server (`ray job list`). "
                    "Give every island its own store credentials instead (an instance profile or IRSA role, a "
                    "Kubernetes secret mounted in its pods, or variables set where its nodes start; see "
                    "cluster/README.md) and forward only names that are not secrets, e.g. AWS_DEFAULT_REGION"
                )
        # What the file itself forwards (each island's runtime_env, its jobs' settings): the same check
        # `ddm submit` makes over each whole submission, here at load so the file is refused as written.
        check_forwarded(
            {"islands": {n: {"runtime_env": i.runtime_env, "overrides": i.overrides} for n, i in self.islands.items()}},
            "islands file",
        )
        for part, island in self.assignment.items():
            if island not in self.islands:
                raise ValueError(
                    f"assignment: partition {part} -> unknown island {island!r}; islands are {sorted(self.islands)}"
                )
        if self.router_island and self.router_island not in self.islands:
            raise ValueError(f"router_island {self.router_island!r} is not one of the islands {sorted(self.islands)}")
        if self.steps_policy not in ("fixed", "proportional"):
            raise ValueError(f"steps_policy must be fixed or proportional, got {self.steps_policy!r}")


def load_islands(path: str, overrides: list[str] | None = None) -> IslandsConfig:
    return load(IslandsConfig, path, overrides)


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class PlannedJob:
    name: str  # expert-00 ... / router
    island: str
    config: JobConfig


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
        work = sizes[k] * steps[k]
        best = min(
            islands.islands,
            key=lambda n: ((load[n] + work) / islands.islands[n].capacity, list(islands.islands).index(n)),
        )
        out[k] = best
        load[best] += sizes[k] * steps[k]
    return out  # type: ignore[return-value]


def plan_jobs(spec: RunSpec, islands: IslandsConfig, sizes: list[int]) -> list[PlannedJob]:
    """The experts (one per partition) and the router, each with its island and full config."""
    k = len(sizes)
    steps = [spec.expert.steps] * k
    if islands.steps_policy == "proportional":
        steps = [max(1, round(spec.expert.steps * n * k / sum(sizes))) for n in sizes]
    *experts, router = jobs(dataclasses.replace(spec, store=islands.store, monolith=False), k, steps)
    where = assign(sizes, islands, steps)
    router_island = islands.router_island or max(islands.islands, key=lambda n: islands.islands[n].capacity)
    placed = [(f"expert-{p:02d}", where[p], cfg) for p, cfg in enumerate(experts)] + [("router", router_island, router)]
    return [PlannedJob(name, isl, _with_overrides(cfg, islands.islands[isl].overrides)) for name, isl, cfg in placed]


def _with_overrides(cfg: JobConfig, overrides: dict) -> JobConfig:
    return from_dict(JobConfig, deep_merge(to_dict(cfg), overrides)) if overrides else cfg


def submission_id(store_url: str, job: str, attempt: int) -> str:
    return f"ddm-{run_id(store_url)}-{job}-{attempt}"


def plan_record(jobs: list[PlannedJob], islands: IslandsConfig) -> dict:
    """The plan as the store keeps it (``islands/plan.json``)."""
    return {
        "kind": "ddm.islands-plan",
        "store": islands.store,
        "jobs": [
            {"name": j.name, "island": j.island, "run_dir": j.config.run_dir, "config": to_dict(j.config)} for j in jobs
        ],
    }


def planned_config(job: dict) -> JobConfig:
    """The JobConfig of a job of a stored plan (plans of ddm 0.1 included)."""
    return from_dict(JobConfig, job["config"])


def relocated(job: dict, island: str, islands: IslandsConfig) -> dict:
    """A planned job (as the plan stores it) on another island, under that island's overrides,
    which may change only what a resumed job may change (``ddm.train.job.RESUMABLE``: workers, GPUs,
    steps, checkpoint settings; the job reshards its checkpoint to the new worker count)."""
    config = to_dict(_with_overrides(planned_config(job), islands.islands[island].overrides))
    diffs = config_changes(job["config"], config)
    if diffs:
        raise ValueError(
            f"--move {job['name']}={island}: that island's overrides change what the job trains ({diffs}); a moved "
            "job may change only its workers, GPUs, steps and checkpoint settings"
        )
    return {**job, "island": island, "config": config}


def check_plan_matches(old: dict, new: dict) -> None:
    """A new submission must train what the store's plan trains (islands may change)."""
    old_jobs = {j["name"]: j for j in old["jobs"]}
    new_jobs = {j["name"]: j for j in new["jobs"]}
    if set(old_jobs) != set(new_jobs):
        raise ValueError(
            f"the store's run has jobs {sorted(old_jobs)} but this spec makes {sorted(new_jobs)}; use a new store "
            "for a new run"
        )
    for name, j in new_jobs.items():
        diffs = config_changes(old_jobs[name]["config"], j["config"])
        if diffs:
            raise ValueError(
                f"{name} in the store's run was planned with other settings ({diffs}); use a new store for a new run"
            )


def check_plan(plan: object, store_url: str, where: str) -> dict:
    """A stored plan as ``submit``, ``status`` and ``resume`` may use it: every job's name and folder a
    safe name below the store, and every job's config training in that folder of this same store
    (a plan edited to send a resumed job's writes elsewhere is refused, not followed)."""
    if not isinstance(plan, dict) or not isinstance(plan.get("jobs"), list):
        raise ValueError(f"{where} is not a plan of ddm submit; submit the run again with `ddm submit`")
    for job in plan["jobs"]:
        if not isinstance(job, dict) or not isinstance(job.get("config"), dict):
            raise ValueError(f"{where}: a job without its config; submit the run again with `ddm submit`")
        safe_relpath(job.get("name"), f"{where} (a job's name)")
        safe_relpath(job.get("run_dir"), f"{where} (the folder of {job['name']})")
        cfg = planned_config(job)
        if _same_store(cfg.store) != _same_store(store_url) or cfg.run_dir != job["run_dir"]:
            raise ValueError(
                f"{where}: job {job['name']} would train in {redact_url(cfg.store)}/{cfg.run_dir}, not in this "
                f"store's {job['run_dir']}; the plan was changed by hand: submit the run again with `ddm submit`"
            )
    return plan


def _same_store(url: str) -> str:
    """A store URL as ``ddm.store.Store`` resolves it (absolute path, ``file:/x`` form, no trailing /)."""
    return absolute_url(check_store_url(url)).rstrip("/")


def submission_record(store: "Store", job: str, islands: IslandsConfig) -> dict | None:
    """A job's submission record, checked: its island known, its attempt a count, its submission id
    the one ddm makes of them (it goes into the island's job-server URL, with the island's token)."""
    path = layout.plan_job_record(job)
    if not store.exists(path):
        return None
    record = store.read_json(path)
    attempt = record.get("attempt") if isinstance(record, dict) else None
    if (
        not isinstance(attempt, int)
        or attempt < 0
        or record.get("island") not in islands.islands
        or record.get("submission_id") != submission_id(islands.store, job, attempt)
    ):
        raise ValueError(
            f"{redact_url(store.url)}/{path} is not a submission record of ddm submit; delete it and resume"
        )
    return record
