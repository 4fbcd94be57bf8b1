"""The ``ddm`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from ddm import __version__

DESCRIPTION = textwrap.dedent(
    """\
    ddm trains Decentralized Diffusion Models (McAllister et al., CVPR 2025).

    The data is split into K semantic partitions; one expert flow-matching model is
    trained per partition, each in full isolation (its own job, its own cluster); a
    small router learns p(partition | x_t, t, c); at sampling time the router combines
    the experts. With every expert weighted by the router's posterior ("full") this is
    exactly the flow of one model trained on all the data; "top-1" (the default) runs
    one expert per sample and step.

      data ─► partitions ─► expert 0 … expert K-1 (isolated) ─┐
                       └──► router ────────────────────────────┴─► ensemble ─► samples
    """
)

EPILOG = textwrap.dedent(
    """\
    examples:
      ddm run launch/digits.yaml                the whole pipeline on digits, locally (a few minutes on 2 CPU cores)
      ddm demo                                  the whole method on a 2-D mixture (~1 min on 2 CPU cores)
      ddm demo -c launch/demo.yaml num_partitions=8 rules='[top1, full]'
      ddm ingest digits runs/digits             shard scikit-learn's digits into a store (any fsspec URL)
      ddm partition runs/digits num_partitions=4   two-stage k-means into 4 semantic partitions
      ddm train expert -c launch/digits_expert.yaml --partition 0   one expert, Ray Train + DeepSpeed
      ddm train router -c launch/digits_expert.yaml model.num_classes=0   the router, same machinery
      ddm assemble runs/digits && ddm sample runs/digits num_samples=64   ensemble from the store
      ddm evaluate runs/digits                  per-rule table vs the monolith, router accuracy vs t
      ddm distill -c launch/digits_expert.yaml steps=2000   the ensemble distilled into one model
      ddm submit launch/digits.yaml --islands cluster/islands.example.yaml   one Ray job per expert across clusters
      ddm status --islands cluster/islands.example.yaml && ddm resume --islands cluster/islands.example.yaml
      ddm models                                list model presets and their sizes

    Config values are overridden with dotted key=value pairs after the command.
    Run `ddm <command> --help` for a command's options.
    """
)


def _add_config_args(p: argparse.ArgumentParser, default_config: str | None) -> None:
    p.add_argument("-c", "--config", default=default_config, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.num_components=8")


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """Options every training job takes: its spec, where it runs, and config overrides."""
    p.add_argument("-c", "--config", help="experiment spec (YAML), e.g. launch/digits_expert.yaml")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray runtime)")
    p.add_argument("--no-ray", action="store_true", help="run in this process (1 worker), without Ray")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddm", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ddm {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    run = sub.add_parser(
        "run",
        help="the whole pipeline from one spec: ingest, partition, experts + router (+ monolith), assemble, sample, evaluate, report",
        description=textwrap.dedent(
            """\
            Runs every stage of SPEC on the local machine (a local Ray runtime) or on --address:
            ingest -> partition -> K experts, the router and optionally an equal-FLOP monolith,
            each its own Ray Train + DeepSpeed job, as many at once as the CPUs allow -> assemble
            -> distill (distill_steps > 0) -> sample -> evaluate, then writes STORE/report/README.md
            with the per-rule table and images. Running it again skips finished stages and
            resumes unfinished jobs from their last checkpoints; a spec that disagrees with what
            the store holds is an error. Worker logs go to Ray's session directory."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("spec", help="pipeline spec (YAML), e.g. launch/digits.yaml")
    run.add_argument("--address", help="Ray cluster address (default: start a local Ray runtime)")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. store=runs/d2 expert.steps=3000")

    demo = sub.add_parser(
        "demo",
        help="partition a Gaussian mixture, train K experts + router, sample with each rule, compare to a monolith",
        description=textwrap.dedent(
            """\
            The DDM method end to end on a 2-D Gaussian mixture: k-means partitions, one MLP
            expert per partition trained in isolation, a router trained on noised samples,
            ensemble sampling under several rules, and a monolith with the same training FLOPs.
            Writes samples.png (data vs samples per rule) and results.json to output_dir and
            prints energy distances to held-out data (lower is better; compare with the
            data floor, the distance between two data sets of the same size)."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(demo, None)

    ingest = sub.add_parser(
        "ingest",
        help="write a dataset into the store as Parquet shards plus a committed manifest",
        description=textwrap.dedent(
            """\
            Write SOURCE into STORE/data/shards as Parquet and commit STORE/data/MANIFEST.json.
            SOURCE is digits (scikit-learn's bundled 8x8 digits), synthetic:N, an image folder
            with one sub-folder per class, or a Parquet file/folder with image and label columns.
            STORE is any fsspec URL (a local path, file://, s3://bucket/run, memory://).
            Options (key=value): resolution, channels, shard_size, encoder (identity | vae[:hub id]),
            image_column, label_column. Unreadable images are skipped, counted and listed."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ingest.add_argument("source")
    ingest.add_argument("store")
    ingest.add_argument("overrides", nargs="*", metavar="key=value")

    part = sub.add_parser(
        "partition",
        help="cluster the store's dataset into K semantic partitions (two-stage k-means)",
        description=textwrap.dedent(
            """\
            Embed every sample (features=pca offline, or dinov2 as in the paper), fit many fine
            k-means centroids, merge them into K coarse clusters (balanced by default) and write
            STORE/partitions/{assignments.parquet, centroids.safetensors, MANIFEST.json}.
            Options (key=value): num_partitions, features, pca_dim, num_fine, fine_epochs,
            balance, balance_tolerance, batch_size, seed."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    part.add_argument("store")
    part.add_argument("overrides", nargs="*", metavar="key=value")

    train = sub.add_parser("train", help="train an expert or the router as a Ray Train + DeepSpeed job (resumes itself)")
    train_sub = train.add_subparsers(dest="what", metavar="<what>", required=True)
    expert = train_sub.add_parser(
        "expert",
        help="train the expert of one partition",
        description=textwrap.dedent(
            """\
            Train the expert of one partition on one island: Ray Train places num_workers
            workers (local Ray runtime by default, or --address of a cluster), DeepSpeed runs
            ZeRO data parallelism (and MoE expert parallelism) inside them. Checkpoints and the
            EMA export go to STORE/experts/<k>/. Running the same command again resumes from
            the newest committed checkpoint; so do Ray's own restarts after a worker dies.
            Options are TrainConfig fields as key=value, e.g. steps=2000 num_workers=2
            zero_stage=2 model.moe.num_experts=4 model.moe.ep_size=2."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_args(expert)
    expert.add_argument("--partition", type=int, help="which partition's expert (overrides the spec)")
    router = train_sub.add_parser(
        "router",
        help="train the router p(partition | x_t, t, c) on noised samples of all the data",
        description="Same machinery as an expert (Ray Train + DeepSpeed, checkpoints, resume, export to STORE/router/); "
        "the loss is cross-entropy of the partition of noised samples. The paper's router is a DiT-B/2 for DiT-XL/2 experts.",
    )
    _add_job_args(router)

    distill = sub.add_parser(
        "distill",
        help="train one dense student from the assembled ensemble (export under STORE/distilled/<ensemble id>/)",
        description=textwrap.dedent(
            """\
            Distil the ensemble into one model, as in the paper: for noised samples x_t of all
            the data the teacher is the expert of each sample's partition, and the student
            regresses its velocity, loss |v(x_t, t, c) - v_teacher|^2. Labels are dropped once
            (class_dropout_prob) for both, so the student keeps classifier-free guidance.
            Same machinery as an expert job (Ray Train + DeepSpeed, checkpoints, resume); the
            student belongs to its teacher: it trains and exports under
            STORE/distilled/<ensemble id>/, loaded like an expert's export. Needs `ddm assemble`
            first. Options are TrainConfig fields as key=value."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_job_args(distill)

    asm = sub.add_parser(
        "assemble",
        help="check the router and every expert's export fit together, and write STORE/ensemble.json",
        description="Checks one committed, checksum-verified export per partition and one for the router, the same data "
        "shape, classes and flow path everywhere, and as many router classes as experts; then writes ensemble.json "
        "(which exports, which router, the default rule). A different existing ensemble.json is never overwritten "
        "unless --replace, which keeps it as a timestamped copy.",
    )
    asm.add_argument("store")
    asm.add_argument("--rule", default="top1", help="default combine rule: top1, top-k, full, threshold:p, nucleus:p, sample")
    asm.add_argument("--replace", action="store_true")

    smp = sub.add_parser(
        "sample",
        help="sample from the store's ensemble: PNG grid + arrays under STORE/samples/<name>/",
        description="Loads ensemble.json (run `ddm assemble` first); experts load only when routed to. Options "
        "(key=value): num_samples, rule (top1, top-2, full, threshold:p, nucleus:p, sample), steps, sampler "
        "(euler|heun), guidance, seed, batch_size, name.",
    )
    smp.add_argument("store")
    smp.add_argument("overrides", nargs="*", metavar="key=value")

    ev = sub.add_parser(
        "evaluate",
        help="per-rule table (monolith, top-1, top-2, full, oracle): distance to the data, expert forwards; router accuracy vs t",
        description=textwrap.dedent(
            """\
            Samples the store's ensemble under each rule with one draw of labels (and partitions,
            for the oracle), plus single models the store holds (monolith, distilled), and
            measures the distance of each sample set to the dataset:
              metric=fd_classifier  Fréchet distance on the features of a small CNN trained on
                                    this dataset (offline; comparable only within one dataset)
              metric=fid            FID on Inception-v3 features (pip install 'ddm[fid]'; the
                                    weights download on first use)
            Writes STORE/eval/<name>/{results.json, report.md, router_accuracy.png, <rule>.png}.
            Options (key=value): rules, num_samples, steps, sampler, guidance, seed, batch_size,
            metric, router_t, name."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("store")
    ev.add_argument("overrides", nargs="*", metavar="key=value")

    sbm = sub.add_parser(
        "submit",
        help="submit one Ray job per expert (and the router) to the islands (Ray clusters) of an islands file",
        description=textwrap.dedent(
            """\
            Plans the run across islands and submits it through each island's Ray Jobs API:
            ingest and partition (here, skipped when the store holds them), one `ddm train
            expert` job per partition on its island, then the router job. Experts go where the
            islands file's assignment says, the rest balanced by partition size x steps over
            island capacity. The plan and every submission are recorded in STORE/islands/.
            Submission ids are deterministic: submitting again never duplicates a pending or
            running job (and never resubmits a finished one). Every island is contacted before
            anything is submitted. --wait follows the run and assembles the ensemble at the end.
            See cluster/islands.example.yaml."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sbm.add_argument("spec", help="pipeline spec (YAML) whose expert/router sections define the jobs, e.g. launch/digits.yaml")
    sbm.add_argument("--islands", required=True, help="islands file (YAML)")
    sbm.add_argument("--wait", action="store_true", help="follow the jobs until they end, then assemble")
    sbm.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides, e.g. expert.steps=20000")

    st = sub.add_parser("status", help="one table across islands: each job's state, step, newest checkpoint, loss, throughput")
    st.add_argument("--islands", required=True, help="islands file (YAML)")
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    rs = sub.add_parser(
        "resume",
        help="submit again what failed, stopped or was lost; jobs resume from their last commits; assemble when all are done",
    )
    rs.add_argument("--islands", required=True, help="islands file (YAML); addresses may differ from the first submission")
    rs.add_argument("--wait", action="store_true", help="follow the jobs until they end, then assemble")

    sub.add_parser("models", help="list the model presets (DiT sizes, MLP sizes) with parameter counts")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.evaluate import format_report
    from ddm.pipeline import JobsFailed, RunSpec, run_pipeline

    spec = load(RunSpec, args.spec, args.overrides)
    try:
        results = run_pipeline(spec, args.address)
    except JobsFailed as e:  # jobs that used up their restarts: say which, and that a re-run resumes
        print(f"ddm run: {e}", file=sys.stderr)
        return 1
    print(format_report(results))
    print(f"report: {spec.store}/report/README.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.demo import DemoConfig, format_results, run_demo

    cfg = load(DemoConfig, args.config, args.overrides)
    results = run_demo(cfg)
    print(format_results(results))
    print(f"\nfigure:  {results['figure']}\nresults: {cfg.output_dir}/results.json  ({results['seconds']:.0f} s)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.store import Store

    cfg = load(IngestConfig, None, [f"source={args.source}", *args.overrides])
    m = ingest(cfg, Store(args.store))
    print(
        f"{m['num_samples']} samples of shape {tuple(m['sample_shape'])} ({m['dtype']}), {m['num_classes']} classes, "
        f"{len(m['shard_rows'])} shards -> {args.store}/data  (skipped {m['skipped']['count']} unreadable)"
    )
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.data.partition import PartitionConfig, partition
    from ddm.store import Store

    cfg = load(PartitionConfig, None, args.overrides)
    m = partition(cfg, Store(args.store))
    print(f"{m['num_partitions']} partitions, sizes {m['counts']} (largest/mean {m['max_over_mean']:.2f}) -> {args.store}/partitions")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from ddm.config import load
    from ddm.train.expert import TrainConfig, check_inputs, with_teacher

    overrides = list(args.overrides) + ([f"partition={args.partition}"] if getattr(args, "partition", None) is not None else [])
    if args.what in ("router", "distill"):
        overrides.append(f"job={args.what}")
    cfg = with_teacher(load(TrainConfig, args.config, overrides))
    check_inputs(cfg)
    if args.no_ray:
        from ddm.train.expert import train

        if cfg.num_workers != 1:
            raise ValueError("--no-ray runs one process: set num_workers=1 (or use torchrun/deepspeed launchers)")
        summary = train(cfg)
    else:
        import ray

        from ddm.islands import run_expert

        ray.init(address=args.address, include_dashboard=False) if args.address else ray.init(include_dashboard=False)
        summary = run_expert(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from ddm.ensemble import assemble
    from ddm.store import Store

    d = assemble(Store(args.store), args.rule, args.replace)
    print(f"ensemble of {d['num_experts']} experts + router, rule {d['rule']} -> {args.store}/ensemble.json")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.sample import SampleConfig, sample
    from ddm.store import Store

    meta = sample(Store(args.store), load(SampleConfig, None, args.overrides))
    print(f"{meta['config']['num_samples']} samples, rule {meta['rule']}, {meta['expert_forwards_per_sample']:.0f} expert "
          f"forwards per sample -> {args.store}/{meta['dir']}/grid.png")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.evaluate import EvalConfig, evaluate, format_report
    from ddm.store import Store

    cfg = load(EvalConfig, None, args.overrides)
    report = evaluate(Store(args.store), cfg)
    print(format_report(report))
    print(f"-> {args.store}/{report['dir']}/ (results.json, report.md, router_accuracy.png)")
    return 0


def _follow(islands) -> int:
    from ddm.submit import assemble_if_complete, format_status, wait

    s = wait(islands)
    print(format_status(s))
    if assemble_if_complete(islands) is not None:
        print(f"assembled -> {islands.store}/ensemble.json")
        return 0
    return 1


def cmd_submit(args: argparse.Namespace) -> int:
    from ddm.config import load
    from ddm.pipeline import RunSpec
    from ddm.submit import load_islands, submit

    islands = load_islands(args.islands)
    spec = load(RunSpec, args.spec, args.overrides)
    done = submit(spec, islands)
    for d in done:
        print(f"{d['job']:<10} -> {d['island']:<10} {d['submission_id']}")
    if not done:
        print("nothing to submit: every job is finished, pending or running (see `ddm status`)")
    return _follow(islands) if args.wait else 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from ddm.submit import format_status, load_islands, status

    s = status(load_islands(args.islands))
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from ddm.submit import assemble_if_complete, load_islands, submit

    islands = load_islands(args.islands)
    done = submit(None, islands, resume_only=True)
    for d in done:
        print(f"{d['job']:<10} -> {d['island']:<10} {d['submission_id']}  (resubmitted)")
    if args.wait:
        return _follow(islands)
    if assemble_if_complete(islands) is not None:
        print(f"every export exists: assembled -> {islands.store}/ensemble.json")
    elif not done:
        print("nothing to resume: every unfinished job is pending or running (see `ddm status`)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import torch

    from ddm.models import DIT_SIZES, MLP_SIZES, ModelConfig, build_model

    print(f"{'preset':<12}{'params':>10}  shape")
    for name in list(DIT_SIZES) + list(MLP_SIZES):
        shape = (4, 32, 32) if name in DIT_SIZES else (2,)
        with torch.device("meta"):  # counts without allocating XL's 675M parameters
            model = build_model(ModelConfig(name, shape, num_classes=1000 if name in DIT_SIZES else 0))
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:<12}{n / 1e6:>9.2f}M  {'32x32x4 latents, 1000 classes' if name in DIT_SIZES else '2-D points'}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    args.what = "distill"
    return cmd_train(args)


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "resume": cmd_resume, "distill": cmd_distill, "demo": cmd_demo, "ingest": cmd_ingest, "partition": cmd_partition, "train": cmd_train, "assemble": cmd_assemble, "sample": cmd_sample, "evaluate": cmd_evaluate, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow options (`ddm submit spec --islands f a.b=1`), which
    # argparse alone does not allow once the positional list was closed.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    from ddm.store import StoreError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, StoreError) as e:  # user errors and unreachable stores: one clear line
        print(f"ddm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
