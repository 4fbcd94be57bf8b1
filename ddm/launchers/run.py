"""``ddm run``: the whole DDM pipeline from one spec, on the local machine or one Ray cluster.

Stages, each skipped when its output is already committed in the store and resumed when it is
not: ingest -> partition -> training jobs (K experts, the router and, when asked, a monolith with
the same total FLOPs, each its own Ray Train job, as many at once as the cluster's CPUs allow)
-> assemble -> distill (optional) -> sample -> evaluate -> learning curves (with
``budget.curve_points``) -> report (``report/``: README.md +
images, rewritten at the end of every run).

A re-run with the same spec finds finished jobs by their committed exports and resumes the others
from their newest checkpoints; a spec that would train something else than what the store holds
(another model, partitioning or dataset) is an error that names the difference.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager

from ddm.core.logs import progress
from ddm.data.ingest import ingest
from ddm.data.partition import partition
from ddm.distributed.ray_runtime import ray_cluster
from ddm.ensemble.assemble import assemble, read_ensemble
from ddm.ensemble.sample import sample
from ddm.eval.curves import learning_curves
from ddm.eval.evaluate import evaluate
from ddm.eval.report import write_report
from ddm.launchers.ray_job import ray_lane, ray_task, summary_of
from ddm.launchers.spec import RunSpec, check_no_secrets, jobs, make_text_encoder, student
from ddm.store import Store, layout
from ddm.store.lease import default_ttl, holding
from ddm.train.budget import arm_of
from ddm.train.job import JobConfig, check_inputs, is_finished, with_teacher

log = logging.getLogger("ddm.run")


class JobsFailed(RuntimeError):
    """Training jobs that ended without their export (after Ray's restarts); a re-run resumes them."""


def run_pipeline(spec: RunSpec, address: str | None = None) -> dict:
    """Run every stage of ``spec``; returns the evaluation report (also written under report/)."""
    spec = spec.resolved()
    check_no_secrets(spec)  # before anything is written or started
    # One `ddm run` per store at a time; its stages and jobs also take the leases of what they write.
    with holding(Store(spec.store), layout.RUN_LEASE, "ddm run") as (store, _):
        return _run_stages(spec, store, address)


def _run_stages(spec: RunSpec, store: Store, address: str | None) -> dict:
    started_at = time.time()
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str):
        log.info("== %s", name)
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0

    with stage("ingest"):
        make_text_encoder(spec, store)
        data = ingest(spec.ingest, store, address)
    with stage("partition"):
        parts = partition(spec.partition, store, address)
    configs = jobs(spec, int(parts["num_partitions"]))
    for c in configs:  # every job's inputs (and agreement with what the store holds) before any starts
        check_inputs(c)
    distill = student(spec)
    # Distillation is still to do unless the current ensemble (if any) already has its student.
    distill_done = distill is None or (store.exists(layout.ENSEMBLE_FILE) and is_finished(with_teacher(distill)))
    # Workers log to Ray's session directory, not over the progress bars.
    needed = not distill_done or not all(is_finished(c) for c in configs)
    with ray_cluster(address, needed, log_to_driver=False):
        with stage("train"):
            run_jobs(store, configs, spec.max_concurrent_jobs, reuse_workers=spec.reuse_workers)
        with stage("assemble"):
            try:  # the ensemble before this run's (a broken one is kept aside by assemble)
                old = read_ensemble(store) if store.exists(layout.ENSEMBLE_FILE) else None
            except ValueError:
                old = None
            if assemble(store, spec.rule, replace=True) != old and old is not None:  # e.g. experts trained longer
                log.info(
                    "the exports changed since %s was written: the old one is kept as a copy", layout.ENSEMBLE_FILE
                )
        if distill is not None:
            with stage("distill"):
                distill = with_teacher(distill)
                check_inputs(distill)
                run_jobs(store, [distill], 1)
    with stage("sample"):
        samples = sample(store, spec.sample)
    baselines = [arm_of(c) for c in configs if c.kind == "monolith"]  # the monoliths the budget trained
    with stage("evaluate"):
        rules = [r for r in spec.evaluate.rules if not r.startswith("monolith") or r in baselines]
        rules += [r for r in baselines + (["distilled"] if distill else []) if r not in rules]
        results = evaluate(store, dataclasses.replace(spec.evaluate, rules=rules))
    curves = None
    if spec.budget.curve_points:
        with stage("curves"):
            curves = learning_curves(store, spec.evaluate, spec.budget.curve_points, spec.budget.curve_rules, baselines)
        results = {**results, "curves": curves}
    jobs_run = configs + ([distill] if distill else [])
    write_report(store, spec, data, parts, jobs_run, samples, results, timings, started_at)
    return results


def run_jobs(
    store: Store, configs: list[JobConfig], max_concurrent: int = 0, poll_s: float = 2.0, reuse_workers: bool = True
) -> dict[str, dict]:
    """Run checked training jobs on the connected Ray cluster, a bounded number at a time, with one
    progress bar each (read from the jobs' progress.json in the store). Jobs already finished
    are skipped. With ``reuse_workers``, jobs of one worker shape run in lanes (``lanes``), one
    Ray Train worker group each, so each slot pays Ray Train's start once. Returns {run_dir:
    summary}; raises after all jobs ended if any failed."""
    import ray

    todo = [c for c in configs if not is_finished(c)]
    for c in configs:
        if c not in todo:
            log.info("%s: finished earlier (export at step %d), skipped", c.run_dir, c.steps)
    if not todo:
        return {}
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), float(resources.get("GPU", 0))
    per_job = max(c.ray.num_workers * c.ray.cpus_per_worker for c in todo)
    if per_job > cpus:
        raise ValueError(
            f"a job needs {per_job} CPUs but the Ray cluster has {cpus}; lower ray.num_workers or ray.cpus_per_worker"
        )
    slots = max(1, cpus // per_job)
    gpu_jobs = [c.ray.num_workers * c.ray.gpus_per_worker for c in todo if c.ray.use_gpu]
    if gpu_jobs:
        if max(gpu_jobs) > gpus:
            raise ValueError(f"a job needs {max(gpu_jobs):g} GPUs but the Ray cluster has {gpus:g}")
        slots = min(slots, max(1, int(gpus // max(gpu_jobs))))
    slots = max_concurrent or slots
    log.info(
        "%d training jobs, %d at a time on %d CPUs, %g GPUs (Ray worker logs: %s)",
        len(todo),
        slots,
        cpus,
        gpus,
        _ray_log_dir(),
    )
    one, several = (ray.remote(num_cpus=0, max_retries=0)(f) for f in (ray_task, ray_lane))
    # Every job is queued until it starts: the first of a lane when the lane is sent to Ray, the
    # next when the one before it has taken its last step. Its clock (the rate) starts then.
    bars = {
        c.run_dir: progress(total=c.steps, desc=f"{c.run_dir:<11}", position=i, unit="step", leave=True, queued=True)
        for i, c in enumerate(todo)
    }
    earlier = {c.run_dir: _step(store.child(c.run_dir)) for c in todo}  # a resumed job's steps so far
    pending = lanes(todo, slots) if reuse_workers else [[c] for c in sorted(todo, key=_cost, reverse=True)]
    running, summaries, failures, requeued, started = {}, {}, {}, set(), set()

    def start(c: JobConfig) -> None:
        started.add(c.run_dir)
        bar = bars[c.run_dir]
        bar.reset()
        if earlier[c.run_dir]:  # steps of an earlier run count for the bar, not for this run's rate
            bar.initial = bar.n = earlier[c.run_dir]

    def finished(c: JobConfig, summary: dict) -> None:
        if c.run_dir not in started:
            start(c)
        summaries[c.run_dir], bar = summary, bars[c.run_dir]
        bar.update(c.steps - bar.n)
        bar.set_postfix_str(f"loss {summary.get('final_loss') or float('nan'):.4f} done")

    try:
        while pending or running:
            while pending and len(running) < slots:
                lane = pending.pop(0)
                wait = default_ttl() if lane[0].run_dir in requeued else 0.0
                running[one.remote(lane[0], wait) if len(lane) == 1 else several.remote(lane)] = lane
                start(lane[0])
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for lane in running.values():
                for before, c in zip([None, *lane], lane):
                    if c.run_dir not in started and before is not None and bars[before.run_dir].n >= before.steps:
                        start(c)
                    if c.run_dir in started:
                        _update_bar(bars[c.run_dir], store.child(c.run_dir))
            for ref in done:
                lane = running.pop(ref)
                try:
                    out = ray.get(ref)
                    for c, summary in zip(lane, out if len(lane) > 1 else [out]):
                        if "refused" in summary:  # its lease was held by another writer
                            failures[c.run_dir] = RuntimeError(summary["refused"])
                            bars[c.run_dir].set_postfix_str("FAILED")
                        else:
                            finished(c, summary)
                except Exception as e:  # a job that used up its restarts: keep the others going
                    left = [c for c in lane if not is_finished(c)]
                    for c in lane:
                        if c not in left:
                            finished(c, summary_of(c))
                    if not left:  # every job's export is committed: what failed came after them
                        log.warning("a lane of %s failed after its last job: %s", lane[0].run_dir, e)
                        continue
                    failures[left[0].run_dir] = e  # a lane runs its jobs in order: the first unfinished failed
                    bars[left[0].run_dir].set_postfix_str("FAILED")
                    # The lane's jobs it never started, on their own; their leases may outlive a lane
                    # whose process died, so each waits for its lease up to the lease's lifetime.
                    requeued.update(c.run_dir for c in left[1:])
                    pending.extend([c] for c in left[1:])
    finally:
        for bar in bars.values():
            bar.close()
    if failures:
        first = next(iter(failures.values()))
        raise JobsFailed(
            f"training jobs failed: {', '.join(failures)}; run the same command again to resume them. First error: "
            f"{first}"
        )
    return summaries


def _cost(c: JobConfig) -> float:
    return c.flops_per_step() * c.steps


def lanes(jobs: list[JobConfig], slots: int) -> list[list[JobConfig]]:
    """The jobs cut into lanes, each run by one Ray Train worker group, one job after another: per
    worker shape (workers, CPUs, GPUs) at most ``slots`` lanes, filled longest job first into the
    lane with the least work so far (their training FLOPs), so the lanes end about together. A MoE
    job runs alone (DeepSpeed keeps its expert-parallel groups per process). Longest lane first."""
    shape = lambda c: (c.ray.num_workers, c.ray.cpus_per_worker, c.ray.use_gpu, c.ray.gpus_per_worker)  # noqa: E731
    out = [[c] for c in jobs if c.model.moe.enabled]
    dense = sorted((c for c in jobs if not c.model.moe.enabled), key=_cost, reverse=True)
    for key in dict.fromkeys(shape(c) for c in dense):
        group = [c for c in dense if shape(c) == key]
        bins: list[list[JobConfig]] = [[] for _ in range(min(slots, len(group)))]
        for c in group:
            min(bins, key=lambda b: sum(map(_cost, b))).append(c)
        out += bins
    return sorted(out, key=lambda lane: -sum(map(_cost, lane)))


def _progress(run: Store) -> dict | None:
    """A job's progress.json (None before it ever trained, or while it is not readable)."""
    try:
        p = run.read_json(layout.PROGRESS)
    except (FileNotFoundError, ValueError):
        return None
    return p if isinstance(p, dict) and isinstance(p.get("step"), int) else None


def _step(run: Store) -> int:
    """The step a job's progress.json last reported (0 before it ever trained)."""
    p = _progress(run)
    return p["step"] if p else 0


def _update_bar(bar, run: Store) -> None:
    p = _progress(run)
    if p and p["step"] > bar.n:
        bar.update(p["step"] - bar.n)
        bar.set_postfix_str(f"loss {p['loss']:.4f}, {p['steps_per_s']:.1f} step/s lately")


def _ray_log_dir() -> str:
    import ray

    try:
        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except AttributeError:  # a client connection has no local node: only a hint in a log line
        return "see `ray status`"
