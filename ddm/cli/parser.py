"""The ``ddm`` command. Each command's ``--help`` is the docstring of the module that implements it,
followed by the fields of its config (every one settable as ``key=value``)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import re
import signal
import sys
import textwrap
import typing

from ddm import __version__
from ddm.cli.commands import COMMANDS
from ddm.core.logs import setup_logging
from ddm.core.secrets import redact_urls
from ddm.data.config import IngestConfig, PartitionConfig
from ddm.demo.config import DemoConfig
from ddm.ensemble.settings import SampleConfig
from ddm.eval.settings import EvalConfig
from ddm.launchers.spec import RunSpec
from ddm.store import StoreError
from ddm.store.lease import LeaseHeld, LeaseLost
from ddm.store.retries import refusal
from ddm.train.job import JobConfig

EPILOG = textwrap.dedent(
    """\
    examples:
      ddm run launch/digits.yaml                the whole pipeline on digits, locally (a few minutes on 2 CPU cores)
      ddm demo                                  the whole method on a 2-D mixture (~1 min on 2 CPU cores)
      ddm demo -c launch/demo.yaml num_partitions=8 rules='[top1, full]'
      ddm ingest digits runs/digits             shard scikit-learn's digits into a store (any fsspec URL)
      ddm ingest 's3://bucket/imagenet/train-{0000..1023}.tar' s3://bucket/run resolution=256 encoder=vae --address auto
                                                WebDataset shards -> SD-VAE latents on a Ray cluster's GPUs (resumable)
      ddm partition runs/digits num_partitions=4   two-stage k-means into 4 semantic partitions
      ddm partition runs/digits num_partitions=8 --dry-run   sizes for another K, reusing the stored features
      ddm train expert -c launch/digits_expert.yaml --partition 0   one expert, Ray Train + DeepSpeed
      ddm train router -c launch/digits_expert.yaml   the router, same machinery
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


def _doc(module: str) -> str:
    """A module's docstring as help text: its first line is the summary, the rest the description.
    Read from the module's source, not imported: ``--help`` must not wait for torch, Ray or DeepSpeed."""
    with open(importlib.util.find_spec(module).origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=False)
    return textwrap.dedent((doc or "").strip("\n"))


def _fields(cls: type) -> list[str]:
    """Dotted names of a config dataclass's fields: small sections expanded, large ones as ``name.*``."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if not dataclasses.is_dataclass(tp):
            out.append(name)
        elif len(dataclasses.fields(tp)) <= 5:
            out += [f"{name}.{f.name}" for f in dataclasses.fields(tp)]
        else:
            out.append(f"{name}.*")
    return out


def _options(cls: type) -> str:
    return "\n\nOptions (key=value): " + ", ".join(_fields(cls)) + "."


def _command(sub, name: str, module: str, config: type | None = None, doc: str | None = None, help=None):
    text = doc or _doc(module)
    summary = re.sub(r"^``ddm [a-z ]+``:\s*", "", text.partition("\n")[0]).rstrip(".")
    return sub.add_parser(
        name,
        help=help or summary,
        description=text + (_options(config) if config else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.arch=DiT-S/2")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="job spec (YAML), e.g. launch/digits_expert.yaml")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray runtime)")
    p.add_argument("--no-ray", action="store_true", help="run in this process (1 worker), without Ray")
    p.add_argument(
        "--force",
        action="store_true",
        help="take the job folder's lease from a live holder (which then stops before its next commit)",
    )
    p.add_argument(
        "--lease-wait", type=float, default=0.0, metavar="S", help="wait up to S seconds for another writer to end"
    )
    p.add_argument(
        "--config-sha256", default="", metavar="HEX", help="train only if the -c file has this sha256 (islands)"
    )
    _overrides(p)


MODELS_DOC = "List the model presets (DiT sizes, MLP sizes) with parameter counts."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddm", description=_doc("ddm"), epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ddm {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = _command(sub, "run", "ddm.launchers.run", RunSpec)
    p.add_argument("spec", help="pipeline spec (YAML), e.g. launch/digits.yaml")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray runtime)")
    _overrides(p)

    p = _command(sub, "demo", "ddm.demo.mixture", DemoConfig)
    p.add_argument("-c", "--config", help="YAML config file (default: built-in defaults)")
    _overrides(p)

    p = _command(sub, "ingest", "ddm.data.ingest", IngestConfig)
    p.add_argument(
        "source",
        help="digits, glyphs:N (characters from fonts), synthetic:N, an image folder, Parquet or WebDataset tars",
    )
    p.add_argument("store", help="the run's store: a local path or any fsspec URL (s3://bucket/run)")
    p.add_argument("--address", help="Ray cluster address for runner=ray (default: a local Ray runtime)")
    _overrides(p)

    p = _command(sub, "partition", "ddm.data.partition", PartitionConfig)
    p.add_argument("store")
    p.add_argument("--address", help="Ray cluster address for runner=ray (default: a local Ray runtime)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the partition sizes for these settings without writing partitions (features are kept)",
    )
    _overrides(p)

    train = _command(sub, "train", "ddm.launchers.ray_job")
    kinds = train.add_subparsers(dest="what", metavar="<what>", required=True)
    for name, about in (("expert", "the expert of one partition"), ("router", "the router p(partition | x_t, t, c)")):
        p = _command(kinds, name, "ddm.launchers.ray_job", JobConfig, help=f"train {about}")
        _job_args(p)
        if name == "expert":
            p.add_argument("--partition", type=int, help="which partition's expert (overrides the spec)")
    p = _command(
        sub, "distill", "ddm.launchers.ray_job", JobConfig, help="distil the assembled ensemble into one student"
    )
    _job_args(p)

    p = _command(
        sub,
        "assemble",
        "ddm.ensemble.assemble",
        help="check that the router and the experts' exports fit together; write ensemble.json",
    )
    p.add_argument("store")
    p.add_argument(
        "--rule", default="top1", help="default combine rule: top1, top-k, full, threshold:p, nucleus:p, sample"
    )
    p.add_argument(
        "--replace", action="store_true", help="keep a different existing ensemble.json as ensemble.<its id>.json"
    )

    for name, module, config in (
        ("sample", "ddm.ensemble.sample", SampleConfig),
        ("evaluate", "ddm.eval.evaluate", EvalConfig),
    ):
        p = _command(sub, name, module, config)
        p.add_argument("store")
        _overrides(p)

    p = _command(
        sub,
        "submit",
        "ddm.launchers.islands",
        help="submit one Ray job per expert (and the router) to the islands of an islands file",
    )
    p.add_argument(
        "spec", help="pipeline spec (YAML) whose expert/router sections define the jobs, e.g. launch/digits.yaml"
    )
    p.add_argument("--islands", required=True, help="islands file (YAML), e.g. cluster/islands.example.yaml")
    p.add_argument("--wait", action="store_true", help="follow the jobs until they end, then assemble")
    _overrides(p)
    p = sub.add_parser(
        "status", help="one table across islands: each job's state, step, newest checkpoint, loss, throughput"
    )
    p.add_argument("--islands", required=True, help="islands file (YAML)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p = sub.add_parser(
        "resume", help="submit again what failed, stopped or was lost (jobs resume from their last commits); assemble"
    )
    p.add_argument(
        "--islands", required=True, help="islands file (YAML); addresses may differ from the first submission"
    )
    p.add_argument(
        "--move",
        action="append",
        default=[],
        metavar="JOB=ISLAND",
        help="run an unfinished job on another island from now on (e.g. expert-03=island-b; repeatable), with "
        "that island's overrides: another worker count is fine, the job reshards its last checkpoint",
    )
    p.add_argument("--wait", action="store_true", help="follow the jobs until they end, then assemble")

    sub.add_parser("models", help=MODELS_DOC.rstrip("."), description=MODELS_DOC)
    return parser


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
    if args.command is None:  # a command is required: the help, and the usage-error exit status
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, StoreError) as e:  # user errors and unreachable stores: one clear line
        print(f"ddm {args.command}: error: {redact_urls(str(e))}", file=sys.stderr)
        return 2
    except (LeaseHeld, LeaseLost) as e:  # another writer has the folder: nothing was mixed
        print(f"ddm {args.command}: error: {redact_urls(str(e))}", file=sys.stderr)
        return 3
    except Exception as e:  # the environment refused (credentials, 403, a full disk): one line; a bug: its traceback
        why = refusal(e, getattr(args, "store", None) or "")
        if why is None:
            raise
        print(f"ddm {args.command}: error: {redact_urls(why)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was committed stays, and the same command resumes from it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or a re-raised one) ends nothing now
        print(
            f"\nddm {args.command}: interrupted. Everything committed to the store is kept; run the same command "
            "again to resume from it.",
            file=sys.stderr,
        )
        return 130


def console() -> None:
    """The ``ddm`` command: ``main``'s status becomes the process's. After Ctrl-C that is 130 on every
    machine: the exit handlers run, the streams are flushed and the process exits with 130 directly,
    so nothing at interpreter shutdown can end it by the signal instead (on one CI machine it died of
    SIGINT after printing the resume line)."""
    code = main()
    if code == 130:
        import atexit
        import logging
        import os

        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
