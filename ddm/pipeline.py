"""``ddm run``: the whole DDM pipeline from one spec, on the local machine or one Ray cluster.

Stages, each skipped when its output is already committed in the store and resumed when it is
not: ingest -> partition -> training jobs (K experts, the router and, when asked, a monolith with
the same total FLOPs, each its own Ray Train job, as many at once as the cluster's CPUs allow)
-> assemble -> distill (optional) -> sample -> evaluate -> report. The report (``report/``:
README.md + images) is rewritten at the end of every run.

A re-run with the same spec finds finished jobs by their committed exports and resumes the others
from their newest checkpoints; a spec that would train something else than what the store holds
(another model, partitioning or dataset) is an error that names the difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

from ddm.config import to_dict
from ddm.data.ingest import IngestConfig
from ddm.data.partition import PartitionConfig
from ddm.evaluate import EvalConfig
from ddm.sample import SampleConfig
from ddm.train.expert import TrainConfig, is_finished

log = logging.getLogger("ddm.run")


@dataclass(frozen=True)
class RunSpec:
    """One experiment: where, what data, how many partitions, how each job trains, what to measure."""

    store: str = "runs/digits"
    seed: int = 0  # every training job's seed (data order, init, noise)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    expert: TrainConfig = field(default_factory=TrainConfig)  # template for every expert (store, job, partition set here)
    router: TrainConfig = field(default_factory=lambda: TrainConfig(job="router"))
    monolith: bool = False  # also train one model on all data with the experts' + router's training FLOPs
    distill_steps: int = 0  # > 0: distil the ensemble into one expert-sized student for this many steps
    rule: str = "top1"  # the ensemble's default rule (ensemble.json)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    max_concurrent_jobs: int = 0  # 0: as many as the Ray cluster's CPUs hold at once

    def __post_init__(self) -> None:
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.max_concurrent_jobs < 0:
            raise ValueError(f"max_concurrent_jobs must be >= 0, got {self.max_concurrent_jobs}")


class JobsFailed(RuntimeError):
    """Training jobs that ended without their export (after Ray's restarts); a re-run resumes them."""


def job_flops_per_step(cfg: TrainConfig) -> float:
    """Training FLOPs of one optimizer step: 3x the forward (forward + backward) x the global batch."""
    from ddm.models import forward_flops

    return 3.0 * forward_flops(cfg.model, router=cfg.job == "router") * cfg.global_batch_size


def jobs(spec: RunSpec, num_partitions: int, expert_steps: list[int] | None = None) -> list[TrainConfig]:
    """The training jobs of the spec, experts first (``expert_steps``: each expert's steps, default
    the spec's), then the router; the monolith's steps equalise total FLOPs."""
    base = {"store": spec.store, "seed": spec.seed}
    steps = expert_steps or [spec.expert.steps] * num_partitions
    experts = [dataclasses.replace(spec.expert, **base, job="expert", partition=k, steps=steps[k]) for k in range(num_partitions)]
    router = dataclasses.replace(spec.router, **base, job="router")
    out = [*experts, router]
    if spec.monolith:
        mono = dataclasses.replace(spec.expert, **base, job="expert", partition=-1)
        total = sum(job_flops_per_step(c) * c.steps for c in out)
        steps = max(1, round(total / job_flops_per_step(mono)))
        out.append(dataclasses.replace(mono, steps=steps, checkpoint_every=min(mono.checkpoint_every, steps)))
    return out


def _ray_job(cfg_dict: dict) -> dict:
    """Runs inside a Ray task: one TorchTrainer for one job (its own workers and restarts)."""
    import logging as _logging

    from ddm.config import from_dict
    from ddm.islands import run_expert

    _logging.basicConfig(level=_logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_expert(from_dict(TrainConfig, cfg_dict))


def run_jobs(store, configs: list[TrainConfig], max_concurrent: int = 0, poll_s: float = 2.0) -> dict[str, dict]:
    """Run training jobs on the connected Ray cluster, a bounded number at a time, with one
    progress bar each (read from the jobs' progress.json in the store). Jobs already finished
    are skipped. Returns {run_dir: summary}; raises after all jobs ended if any failed."""
    import ray
    from tqdm.auto import tqdm

    todo = [c for c in configs if not is_finished(c)]
    for c in configs:
        if c not in todo:
            log.info("%s: finished earlier (export at step %d), skipped", c.run_dir, c.steps)
    if not todo:
        return {}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_job = max(c.num_workers * c.cpus_per_worker for c in todo)
    if per_job > cpus:
        raise ValueError(f"a job needs {per_job} CPUs but the Ray cluster has {cpus}; lower num_workers or cpus_per_worker")
    slots = max_concurrent or max(1, cpus // per_job)
    log.info("%d training jobs, %d at a time on %d CPUs (Ray worker logs: %s)", len(todo), slots, cpus, _ray_log_dir())
    remote = ray.remote(num_cpus=0, max_retries=0)(_ray_job)
    bars = {c.run_dir: tqdm(total=c.steps, desc=f"{c.run_dir:<11}", position=i, unit="step", leave=True) for i, c in enumerate(todo)}
    # Longest first (by training FLOPs): with fewer slots than jobs this finishes soonest.
    pending = sorted(todo, key=lambda c: -job_flops_per_step(c) * c.steps)
    running, summaries, failures = {}, {}, {}
    try:
        while pending or running:
            while pending and len(running) < slots:
                c = pending.pop(0)
                running[remote.remote(to_dict(c))] = c
            done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for c in running.values():
                _update_bar(bars[c.run_dir], store.child(c.run_dir))
            for ref in done:
                c = running.pop(ref)
                try:
                    summaries[c.run_dir] = ray.get(ref)
                    bars[c.run_dir].update(c.steps - bars[c.run_dir].n)
                    bars[c.run_dir].set_postfix_str(f"loss {summaries[c.run_dir].get('final_loss') or float('nan'):.4f} done")
                except Exception as e:  # a job that used up its restarts: keep the others going
                    failures[c.run_dir] = e
                    bars[c.run_dir].set_postfix_str("FAILED")
    finally:
        for bar in bars.values():
            bar.close()
    if failures:
        names = ", ".join(failures)
        first = next(iter(failures.values()))
        raise JobsFailed(f"training jobs failed: {names}; run the same command again to resume them. First error: {first}")
    return summaries


def _update_bar(bar, run) -> None:
    try:
        p = run.read_json("progress.json")
    except (FileNotFoundError, ValueError):
        return
    if p["step"] > bar.n:
        bar.update(p["step"] - bar.n)
        bar.set_postfix_str(f"loss {p['loss']:.4f}, {p['steps_per_s']:.1f} step/s")


def _ray_log_dir() -> str:
    try:
        import ray

        return ray.get_runtime_context().gcs_address and f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001 - only a hint in a log line
        return "see `ray status`"


def run_pipeline(spec: RunSpec, address: str | None = None) -> dict:
    """Run every stage of ``spec``; returns the evaluation report (also written under report/)."""
    import ray

    from ddm.data.ingest import ingest
    from ddm.data.partition import partition
    from ddm.ensemble import assemble
    from ddm.evaluate import evaluate
    from ddm.sample import sample
    from ddm.ensemble import ENSEMBLE_FILE
    from ddm.store import Store, absolute_url
    from ddm.train.expert import check_inputs, with_teacher

    spec = dataclasses.replace(spec, store=absolute_url(spec.store))
    store = Store(spec.store)
    timings: dict[str, float] = {}

    def stage(name: str):
        log.info("== %s", name)
        timings[name] = time.perf_counter()

    def end(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]

    stage("ingest")
    data = ingest(spec.ingest, store)
    end("ingest")
    stage("partition")
    parts = partition(spec.partition, store)
    end("partition")

    k = int(parts["num_partitions"])
    configs = jobs(spec, k)
    for c in configs:  # every job's inputs (and agreement with what the store holds) before any starts
        check_inputs(c)
    stage("train")
    student = (
        dataclasses.replace(spec.expert, store=spec.store, seed=spec.seed, job="distill", partition=-1, steps=spec.distill_steps)
        if spec.distill_steps
        else None
    )
    # Distillation is still to do unless the current ensemble (if any) already has its student.
    student_done = student is None or (store.exists(ENSEMBLE_FILE) and is_finished(with_teacher(student)))
    needs_ray = any(not is_finished(c) for c in configs) or not student_done
    started_ray = needs_ray and not ray.is_initialized()
    if started_ray:
        # Workers log to Ray's session directory, not over the progress bars.
        ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else ray.init(include_dashboard=False, log_to_driver=False)
    try:
        run_jobs(store, configs, spec.max_concurrent_jobs)
        end("train")
        stage("assemble")
        old = store.read_json(ENSEMBLE_FILE) if store.exists(ENSEMBLE_FILE) else None
        if assemble(store, spec.rule, replace=True) != old and old is not None:  # e.g. experts trained longer
            log.info("the exports changed since %s was written: the old one is kept as a timestamped copy", ENSEMBLE_FILE)
        end("assemble")
        if student is not None:
            stage("distill")
            student = with_teacher(student)
            check_inputs(student)
            run_jobs(store, [student], 1)
            end("distill")
    finally:
        if started_ray:
            ray.shutdown()

    stage("sample")
    samples = sample(store, spec.sample)
    end("sample")
    stage("evaluate")
    rules = [r for r in spec.evaluate.rules if r != "monolith" or spec.monolith]
    if spec.distill_steps and "distilled" not in rules:
        rules.append("distilled")
    results = evaluate(store, dataclasses.replace(spec.evaluate, rules=rules))
    end("evaluate")
    write_report(store, spec, data, parts, configs, samples, results, timings, [student] if student else [])
    return results


def write_report(store, spec: RunSpec, data: dict, parts: dict, configs, samples: dict, results: dict, timings: dict, students=()) -> None:
    """report/README.md + images (what was trained, how long it took, how good it is) and
    report/results.json (the evaluation of this run's ensemble)."""
    from ddm.evaluate import format_report

    rep = store.child("report")
    lines = [
        "# DDM run report",
        "",
        f"Store `{spec.store}` · dataset `{spec.ingest.source}`: {data['num_samples']} samples of shape "
        f"{tuple(data['sample_shape'])}, {data['num_classes']} classes · K = {parts['num_partitions']} partitions, "
        f"sizes {parts['counts']}",
        "",
        "## Training jobs",
        "",
        "| job | model | steps | global batch | final loss | training FLOPs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in [*configs] + students:
        run = store.child(c.run_dir)
        summ = run.read_json("summary.json") if run.exists("summary.json") else {}
        loss = summ.get("final_loss")
        flops = job_flops_per_step(c) * c.steps
        lines.append(f"| {c.run_dir} | {c.model.arch} | {c.steps} | {c.global_batch_size} | {'' if loss is None else f'{loss:.4f}'} | {flops:.3g} |")
    lines += ["", "## Quality by rule", "", format_report(results), "![router accuracy](router_accuracy.png)", "", "## Samples", ""]
    eval_dir = store.child(results["dir"])
    for name in (v["rule"] for v in results["rules"]):
        fname = f"{name.replace(':', '_')}.png"
        if eval_dir.exists(fname):
            rep.write_bytes(f"samples-{fname}", eval_dir.read_bytes(fname))
            lines.append(f"**{name}**\n\n![{name}](samples-{fname})\n")
    rep.write_bytes("router_accuracy.png", eval_dir.read_bytes("router_accuracy.png"))
    if store.exists(f"{samples['dir']}/grid.png"):
        rep.write_bytes("sample-grid.png", store.read_bytes(f"{samples['dir']}/grid.png"))
        lines.append(f"`ddm sample` output ({samples['rule']}, seed {samples['config']['seed']}):\n\n![samples](sample-grid.png)\n")
    lines += ["## Stage times (this invocation)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items() if v < 1e6]
    lines += ["", "Spec:", "", "```json", json.dumps(to_dict(spec), indent=1), "```", ""]
    rep.write_bytes("README.md", "\n".join(lines).encode())
    rep.write_json("results.json", results)
    log.info("report -> %s/README.md", rep.url)
