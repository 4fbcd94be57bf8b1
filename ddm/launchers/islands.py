"""Jobs across islands: ``ddm submit``, ``ddm status``, ``ddm resume``.

``ddm submit`` assigns each expert to an island (``ddm.launchers.plan``), submits one Ray job per
expert (``ddm train expert`` on that island, which runs Ray Train + DeepSpeed there) and then the
router job; the islands share nothing but the store. Everything needed to follow and resume the
run lives in the store under ``islands/``: the plan (which job runs where, with which config) and,
per job, its latest submission. Submission ids are deterministic (``ddm-<run id>-<job>-<attempt>``),
so submitting again never starts a second copy of a job that is pending or running.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import time
from typing import Any

from ddm.core.secrets import (
    check_forwarded,
    check_token_transport,
    ray_token_auth,
    redact_url,
    redact_urls,
    url_credentials,
)
from ddm.data.ingest import ingest
from ddm.data.partition import partition
from ddm.ensemble.assemble import assemble
from ddm.launchers.plan import (
    Island,
    IslandsConfig,
    check_plan,
    check_plan_matches,
    plan_jobs,
    plan_record,
    planned_config,
    relocated,
    submission_id,
    submission_record,
)
from ddm.launchers.spec import RunSpec, check_no_secrets, make_text_encoder
from ddm.store import Store, absolute_url, layout
from ddm.store.lease import holding
from ddm.train.job import check_inputs, is_finished

log = logging.getLogger("ddm.islands")

ACTIVE = ("PENDING", "RUNNING")

# --- the job servers ------------------------------------------------------------------------------


class IslandError(ValueError):
    """An island that cannot be used: unreachable, wrong address, refused credentials."""


def client(name: str, island: Island):
    """A Ray Jobs client for the island, with errors that say what is wrong and where (its address
    redacted: ``user:password@`` never shows). A token (the island's own, or Ray's with
    ``RAY_AUTH_MODE=token``) or a password in the address goes to another machine over TLS only
    (``ddm.core.secrets.check_token_transport``)."""
    from ray.job_submission import JobSubmissionClient

    address = redact_url(island.address)
    if island.auth_token_env or ray_token_auth() or url_credentials(island.address):
        try:
            check_token_transport(island.address, f"island {name!r}")
        except ValueError as e:
            raise IslandError(str(e)) from None
    headers = None
    if island.auth_token_env:
        token = os.environ.get(island.auth_token_env)
        if not token:
            raise IslandError(
                f"island {name!r} reads its Ray token from ${island.auth_token_env}, which this shell does not set"
            )
        headers = {"Authorization": f"Bearer {token}"}
    try:
        c = JobSubmissionClient(island.address, headers=headers)
        c.list_jobs()  # an authenticated call: the version probe alone may pass without credentials
        return c
    except Exception as e:  # noqa: BLE001 - the Jobs SDK raises bare ConnectionError/RuntimeError
        text = f"{type(e).__name__}: {e}"
        if any(s in text for s in ("401", "403", "Unauthorized", "Forbidden", "uthenticat")):
            raise IslandError(
                f"island {name!r} ({address}) refused the request: authentication failed. In this shell set "
                "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to that cluster's token"
            ) from e
        raise IslandError(
            f"island {name!r} cannot be reached at {address} ({redact_urls(text.splitlines()[0][:300])})"
        ) from e


def _job_state(c, sid: str) -> str:
    try:
        st = c.get_job_status(sid)
        return str(getattr(st, "value", st))
    except Exception as e:  # noqa: BLE001
        if "does not exist" in str(e) or "404" in str(e) or "not found" in str(e).lower():
            return "LOST"  # the server does not know it (restarted cluster, wrong island)
        raise IslandError(f"job server error for {sid}: {redact_urls(str(e))}") from e


def _forwarded_env(islands: IslandsConfig) -> dict[str, str]:
    missing = [n for n in islands.env if n not in os.environ]
    if missing:
        raise ValueError(f"the islands file forwards {missing}, but this shell does not set them; export them first")
    return {n: os.environ[n] for n in islands.env}


# A job resubmitted after its island was lost waits for the lost attempt's lease to expire.
LEASE_WAIT_S = 300


def _entrypoint(island: Island, config: dict, config_url: str) -> str:
    """The island's command: its job config is read from the store, and checked there against the
    digest that the submission carries (Ray keeps it, not the store): a config rewritten in the
    store after the submission is refused, not trained."""
    what = "router" if config["job"] == "router" else "expert"
    digest = hashlib.sha256(json.dumps(config, indent=2, sort_keys=True, allow_nan=False).encode()).hexdigest()
    return (
        f"{island.ddm_command} train {what} -c {shlex.quote(config_url)} --config-sha256 {digest} "
        f"--lease-wait {LEASE_WAIT_S}"
    )


def _runtime_env(island: Island, env: dict[str, str]) -> dict:
    """The island's runtime_env with the forwarded variables among its env_vars."""
    return {**island.runtime_env, "env_vars": {**island.runtime_env.get("env_vars", {}), **env}}


def _submission(islands: IslandsConfig, job: dict, env: dict[str, str], sid: str) -> dict:
    """Everything a job's submission hands its island (``JobSubmissionClient.submit_job``'s arguments)."""
    island = islands.islands[job["island"]]
    return {
        "entrypoint": _entrypoint(island, job["config"], f"{islands.store}/{layout.plan_job_config(job['name'])}"),
        "submission_id": sid,
        "runtime_env": _runtime_env(island, env),
        "metadata": {"ddm_job": job["name"], "ddm_run": layout.run_id(islands.store)},
    }


def _check_submission(islands: IslandsConfig, job: dict, env: dict[str, str]) -> None:
    """``ddm.core.secrets.check_forwarded`` over all a job's submission sends its island, and over its
    config (which the job reads from the store, and Ray keeps with the run)."""
    sid = submission_id(islands.store, job["name"], 0)
    check_forwarded(
        {**_submission(islands, job, env, sid), "config": job["config"]}, f"the submission of {job['name']}"
    )


# --- submit / status / resume ----------------------------------------------------------------------


def _resolved(islands: IslandsConfig) -> tuple[IslandsConfig, Store]:
    islands = dataclasses.replace(islands, store=absolute_url(islands.store))
    return islands, Store(islands.store)


def _read_plan(islands: IslandsConfig, store: Store) -> dict:
    if not store.exists(layout.PLAN_FILE):
        raise ValueError(
            f"{redact_url(islands.store)} has no submitted run ({layout.PLAN_FILE}); use `ddm submit` first"
        )
    return check_plan(store.read_json(layout.PLAN_FILE), islands.store, f"{redact_url(store.url)}/{layout.PLAN_FILE}")


def _export_done(job: dict) -> bool:
    return is_finished(planned_config(job))


def submit(
    spec: RunSpec | None, islands: IslandsConfig, resume_only: bool = False, moves: dict[str, str] | None = None
) -> list[dict]:
    """Plan (or check the stored plan) and submit every job that is neither done nor active.

    Islands are contacted before anything is written (a new submission: every island of the file;
    a resume: those it needs), so a wrong address or refused credentials change nothing. ``moves``
    (a resume: job name -> island) sends unfinished jobs to other islands, with those islands'
    overrides (another worker count, GPUs: the job reshards its checkpoint, ``ddm.checkpoint.reshard``).
    """
    islands, store = _resolved(islands)
    env = _forwarded_env(islands)
    # What every island would be sent whatever the plan, before any island or the store is touched.
    for name, island in islands.islands.items():
        check_forwarded({"runtime_env": _runtime_env(island, env)}, f"ddm submit to island {name!r}")
    check_forwarded({"store": islands.store}, "the islands file")
    if spec is not None:
        check_no_secrets(spec)
    store.check_reachable()
    clients: dict[str, Any] = {}
    if not resume_only:  # a new submission needs every island: contact them before the store is touched
        clients = {name: client(name, isl) for name, isl in islands.islands.items()}
    if resume_only:
        plan = _read_plan(islands, store)
        plan = _moved(plan, islands, moves or {})
    else:
        if spec.store not in ("", islands.store) and absolute_url(spec.store) != islands.store:
            log.info(
                "the islands file's store %s is used (the spec says %s)",
                redact_url(islands.store),
                redact_url(spec.store),
            )
        spec = spec.resolved(store.url)
        make_text_encoder(spec, store)
        ingest(spec.ingest, store)  # all idempotent: nothing happens when the store already holds them
        partition(spec.partition, store)
        sizes = [int(n) for n in store.manifest(layout.PARTITIONS_DIR)["counts"]]
        jobs = plan_jobs(spec, islands, sizes)
        for j in jobs:
            check_inputs(j.config)  # data shape, partitions, and agreement with what each run dir holds
        plan = plan_record(jobs, islands)
        if store.exists(layout.PLAN_FILE):
            check_plan_matches(store.read_json(layout.PLAN_FILE), plan)
    for j in plan["jobs"]:
        if j["island"] not in islands.islands:
            raise ValueError(f"{j['name']} runs on island {j['island']!r}, which the islands file no longer lists")
    records = {j["name"]: submission_record(store, j["name"], islands) for j in plan["jobs"]}
    todo = [j for j in plan["jobs"] if not _export_done(j)]
    # Every island that gets a job, or may still run an earlier attempt of one, is contacted first.
    needed = {j["island"] for j in todo} | {records[j["name"]]["island"] for j in todo if records[j["name"]]}
    for name in sorted(needed - set(islands.islands)):
        raise ValueError(
            f"an earlier attempt ran on island {name!r}, which the islands file no longer lists; add it back to "
            "check that job"
        )
    for name in sorted(needed - set(clients)):  # resume: the islands it needs, before any change
        clients[name] = client(name, islands.islands[name])
    for j in todo:  # the exact submissions, before the plan is written or anything submitted
        _check_submission(islands, j, env)
    with holding(store, layout.PLAN_DIR, "ddm resume" if resume_only else "ddm submit") as (writes, _):
        return _submit_jobs(islands, writes, plan, records, todo, clients, env, (not resume_only) or bool(moves))


def _moved(plan: dict, islands: IslandsConfig, moves: dict[str, str]) -> dict:
    """The plan with each job of ``moves`` on its new island, under that island's overrides; a
    move may change only what a resumed job may change (``ddm.train.job.RESUMABLE``)."""
    if not moves:
        return plan
    jobs = {j["name"]: j for j in plan["jobs"]}
    out = []
    for name, island in moves.items():
        if name not in jobs:
            raise ValueError(f"--move {name}={island}: the run has no job {name!r}; its jobs are {sorted(jobs)}")
        if island not in islands.islands:
            raise ValueError(
                f"--move {name}={island}: no island {island!r} in the islands file; "
                f"islands are {sorted(islands.islands)}"
            )
    for j in plan["jobs"]:
        if j["name"] in moves and not _export_done(j):
            log.info("%s moves from %s to %s", j["name"], j["island"], moves[j["name"]])
            j = relocated(j, moves[j["name"]], islands)
        out.append(j)
    return {**plan, "jobs": out}


def _submit_jobs(islands, store, plan, records, todo, clients, env, write_plan) -> list[dict]:
    if write_plan:
        store.write_json(layout.PLAN_FILE, plan)
    submitted = []
    for j in todo:
        record = records[j["name"]]
        c = clients[j["island"]]
        if record is not None:
            state = _job_state(clients[record["island"]], record["submission_id"])
            if state in ACTIVE:  # never a second copy, not even on another island
                log.info(
                    "%s is %s on %s as %s: not submitted again",
                    j["name"],
                    state.lower(),
                    record["island"],
                    record["submission_id"],
                )
                continue
        attempt = 0 if record is None else record["attempt"] + 1
        sid = submission_id(islands.store, j["name"], attempt)
        store.write_json(layout.plan_job_config(j["name"]), j["config"])
        try:
            c.submit_job(**_submission(islands, j, env, sid))
        except Exception as e:  # noqa: BLE001
            if "already exists" not in str(e):
                raise IslandError(f"island {j['island']!r} did not accept {j['name']}: {redact_urls(str(e))}") from e
            log.info("%s: %s already exists on %s", j["name"], sid, j["island"])  # a lost record: same id, no duplicate
        store.write_json(
            layout.plan_job_record(j["name"]),
            {"island": j["island"], "submission_id": sid, "attempt": attempt, "submitted_at": time.time()},
        )
        log.info("submitted %s to %s as %s", j["name"], j["island"], sid)
        submitted.append({"job": j["name"], "island": j["island"], "submission_id": sid})
    return submitted


def status(islands: IslandsConfig) -> dict:
    """One row per job: island, state, step, newest commit, loss, throughput; and whether the
    ensemble can be (or has been) assembled."""
    islands, store = _resolved(islands)
    plan = _read_plan(islands, store)
    clients: dict[str, Any] = {}
    errors: dict[str, str] = {}
    rows = []
    for j in plan["jobs"]:
        run = store.child(j["run_dir"])
        record = submission_record(store, j["name"], islands)
        progress = run.read_json(layout.PROGRESS) if run.exists(layout.PROGRESS) else {}
        commits = layout.committed_steps(run.child(layout.CHECKPOINTS))
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
                state = (
                    "UNREACHABLE"
                    if island_name in errors
                    else _job_state(clients[island_name], record["submission_id"])
                )
        rows.append({
            "job": j["name"], "island": island_name, "state": state, "done": done,
            "step": progress.get("step", 0), "steps": j["config"]["steps"],
            "checkpoint": commits[-1] if commits else None, "loss": progress.get("loss"),
            "steps_per_s": progress.get("steps_per_s"),
            "submission_id": record["submission_id"] if record else None,
        })  # fmt: skip
    return {
        "store": redact_url(islands.store),
        "jobs": rows,
        "unreachable": errors,
        "all_done": all(r["done"] for r in rows),
        "ensemble": store.exists(layout.ENSEMBLE_FILE),
    }


def format_status(s: dict) -> str:
    lines = [
        f"run {s['store']}",
        "",
        f"{'job':<10} {'island':<10} {'state':<14} {'step':>12} {'checkpoint':>10} {'loss':>8} {'steps/s':>8}  "
        "submission",
    ]
    for r in s["jobs"]:
        state = "DONE" if r["done"] else r["state"]
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        sps = "" if r["steps_per_s"] is None else f"{r['steps_per_s']:.1f}"
        ckpt = "" if r["checkpoint"] is None else str(r["checkpoint"])
        lines.append(
            f"{r['job']:<10} {r['island']:<10} {state:<14} {r['step']:>5}/{r['steps']:<6} {ckpt:>10} {loss:>8} "
            f"{sps:>8}  {r['submission_id'] or ''}"
        )
    for name, err in s["unreachable"].items():
        lines.append(f"\nisland {name}: {err}")
    if s["all_done"]:
        lines.append(
            "\nevery export exists: "
            + (
                f"{layout.ENSEMBLE_FILE} is assembled"
                if s["ensemble"]
                else "run `ddm resume` (or `ddm assemble`) to assemble"
            )
        )
    return "\n".join(lines)


def assemble_if_complete(islands: IslandsConfig, rule: str = "top1") -> dict | None:
    """Assemble once every expert's and the router's export exists at its final step."""
    islands, store = _resolved(islands)
    plan = _read_plan(islands, store)
    if not all(_export_done(j) for j in plan["jobs"]):
        return None
    return assemble(store, rule, replace=True)


def wait(islands: IslandsConfig, poll_s: float = 10.0, timeout_s: float | None = None) -> dict:
    """Poll until every job is done (or none is active any more); returns the last status. The
    polls start 1 s apart and back off to ``poll_s``: a short job is seen done within about a
    second, a long one costs its islands' job servers one query per ``poll_s``."""
    t0, every = time.time(), min(1.0, poll_s)
    while True:
        s = status(islands)
        active = [r for r in s["jobs"] if not r["done"] and r["state"] in ACTIVE]
        if s["all_done"] or not active:
            return s
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return s
        time.sleep(every)
        every = min(poll_s, every * 1.5)
