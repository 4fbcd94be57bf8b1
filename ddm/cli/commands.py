"""What each ``ddm`` command does once its arguments are parsed (``ddm.cli`` parses them).

Each command imports its implementation when it runs: parsing and ``--help`` import none of them
(no torch, Ray or DeepSpeed), and a command pays only for its own stack.
"""

from __future__ import annotations

import argparse
import json
import sys

from ddm.core.config import load, to_dict
from ddm.core.logs import stdout_to_stderr
from ddm.core.secrets import check_forwarded
from ddm.data.config import IngestConfig, PartitionConfig
from ddm.demo.config import DemoConfig
from ddm.ensemble.settings import SampleConfig
from ddm.eval.settings import EvalConfig
from ddm.launchers.plan import load_islands
from ddm.launchers.spec import RunSpec
from ddm.store import Store, layout
from ddm.store.urls import check_store_url
from ddm.train.job import JobConfig, check_inputs, resolve


def _store(url: str) -> Store:
    """The store a command names, its URL checked first (``s3:/bucket`` is refused, not made a folder)."""
    return Store(check_store_url(url))


def cmd_run(args: argparse.Namespace) -> int:
    from ddm.eval.evaluate import format_report  # torch, Ray: not for --help
    from ddm.launchers.run import JobsFailed, run_pipeline  # torch, Ray: not for --help

    spec = load(RunSpec, args.spec, args.overrides)
    try:
        results = run_pipeline(spec, args.address)
    except JobsFailed as e:  # jobs that used up their restarts: say which, and that a re-run resumes
        print(f"ddm run: {e}", file=sys.stderr)
        return 1
    print(format_report(results))
    print(f"report: {spec.store}/{layout.REPORT_DIR}/README.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load(DemoConfig, args.config, args.overrides)  # a bad config fails before torch is imported
    from ddm.demo.mixture import format_results, run_demo  # torch, Ray: not for --help

    results = run_demo(cfg)
    print(format_results(results))
    print(f"\nfigure:  {results['figure']}\nresults: {cfg.output_dir}/results.json  ({results['seconds']:.0f} s)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ddm.data.ingest import ingest  # torch, Ray: not for --help

    m = ingest(load(IngestConfig, None, [f"source={args.source}", *args.overrides]), _store(args.store), args.address)
    print(
        f"{m['num_samples']} samples of shape {tuple(m['sample_shape'])} ({m['dtype']}), {m['num_classes']} classes, "
        f"{len(m['shard_rows'])} shards -> {args.store}/{layout.DATA_DIR}  (skipped {m['skipped']['count']} unreadable)"
    )
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from ddm.data.partition import partition  # torch, Ray: not for --help

    m = partition(load(PartitionConfig, None, args.overrides), _store(args.store), args.address, args.dry_run)
    where = "(dry run: nothing written)" if args.dry_run else f"-> {args.store}/{layout.PARTITIONS_DIR}"
    print(f"{m['num_partitions']} partitions, sizes {m['counts']} (largest/mean {m['max_over_mean']:.2f}) {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if getattr(args, "partition", None) is not None:
        overrides.append(f"partition={args.partition}")
    if args.what in ("router", "distill"):
        overrides.append(f"job={args.what}")
    cfg = resolve(load(JobConfig, args.config, overrides, sha256=args.config_sha256))
    check_forwarded(to_dict(cfg), "the job config")  # it travels to the workers and into the store
    check_inputs(cfg)
    if args.no_ray and cfg.ray.num_workers != 1:
        raise ValueError("--no-ray runs one process: set ray.num_workers=1 (or use torchrun/deepspeed launchers)")
    with stdout_to_stderr():  # stdout carries the JSON result only (`ddm train ... | jq`)
        if args.no_ray:
            from ddm.train.trainer import job_lease, train  # torch, Ray: not for --help

            with job_lease(cfg, args.force, args.lease_wait) as token:
                summary = train(cfg, lease=token)
        else:
            from ddm.distributed.ray_runtime import ray_cluster  # Ray: not for --help
            from ddm.launchers.ray_job import run_job  # torch, Ray: not for --help

            with ray_cluster(args.address):
                summary = run_job(cfg, force=args.force, lease_wait_s=args.lease_wait)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    args.what = "distill"
    return cmd_train(args)


def cmd_assemble(args: argparse.Namespace) -> int:
    from ddm.ensemble.assemble import assemble  # torch, Ray: not for --help

    d = assemble(_store(args.store), args.rule, args.replace)
    print(f"ensemble of {d['num_experts']} experts + router, rule {d['rule']} -> {args.store}/{layout.ENSEMBLE_FILE}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ddm.ensemble.sample import sample  # torch, Ray: not for --help

    meta = sample(_store(args.store), load(SampleConfig, None, args.overrides))
    cost = (  # samples drawn before ddm counted FLOPs have expert forwards only
        f", {meta['sampling_flops_per_sample'] / 1e6:,.1f} MFLOPs (router {100 * meta['router_share']:.1f}%)"
        if "sampling_flops_per_sample" in meta
        else ""
    )
    print(
        f"{meta['config']['num_samples']} samples, rule {meta['rule']}, {meta['expert_forwards_per_sample']:.0f} "
        f"expert forwards per sample{cost} -> {args.store}/{meta['dir']}/grid.png"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddm.eval.evaluate import evaluate, format_report  # torch, Ray: not for --help

    report = evaluate(_store(args.store), load(EvalConfig, None, args.overrides))
    print(format_report(report))
    print(f"-> {args.store}/{report['dir']}/ (results.json, report.md, router_accuracy.png)")
    return 0


def _follow(islands) -> int:
    from ddm.launchers.islands import assemble_if_complete, format_status, wait  # torch, Ray: not for --help

    print(format_status(wait(islands)))
    if assemble_if_complete(islands) is not None:
        print(f"assembled -> {islands.store}/{layout.ENSEMBLE_FILE}")
        return 0
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from ddm.launchers.islands import submit  # torch, Ray: not for --help

    islands = load_islands(args.islands)
    done = submit(load(RunSpec, args.spec, args.overrides), islands)
    for d in done:
        print(f"{d['job']:<10} -> {d['island']:<10} {d['submission_id']}")
    if not done:
        print("nothing to submit: every job is finished, pending or running (see `ddm status`)")
    return _follow(islands) if args.wait else 0


def cmd_status(args: argparse.Namespace) -> int:
    from ddm.launchers.islands import format_status, status  # torch, Ray: not for --help

    s = status(load_islands(args.islands))
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from ddm.launchers.islands import assemble_if_complete, submit  # torch, Ray: not for --help

    islands = load_islands(args.islands)
    moves = {}
    for m in args.move:
        job, sep, island = m.partition("=")
        if not sep or not job or not island:
            raise ValueError(f"--move {m!r}: write JOB=ISLAND, e.g. --move expert-03=island-b")
        moves[job] = island
    done = submit(None, islands, resume_only=True, moves=moves)
    for d in done:
        print(f"{d['job']:<10} -> {d['island']:<10} {d['submission_id']}  (resubmitted)")
    if args.wait:
        return _follow(islands)
    if assemble_if_complete(islands) is not None:
        print(f"every export exists: assembled -> {islands.store}/{layout.ENSEMBLE_FILE}")
    elif not done:
        print("nothing to resume: every unfinished job is pending or running (see `ddm status`)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ddm.models.build import preset_table  # torch, Ray: not for --help

    print(preset_table())
    return 0


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "ingest": cmd_ingest,
    "partition": cmd_partition,
    "train": cmd_train,
    "distill": cmd_distill,
    "assemble": cmd_assemble,
    "sample": cmd_sample,
    "evaluate": cmd_evaluate,
    "submit": cmd_submit,
    "status": cmd_status,
    "resume": cmd_resume,
    "models": cmd_models,
}
