"""The run folder: every name under a run's root, and the ids and digests derived from content.

One run lives under one store URL. Every module that reads or writes a run takes its paths from
here, so a name is spelled once::

    data/                           MANIFEST.json + shards/part-00000.parquet ...
    features/<extractor>-<id>/      MANIFEST.json, extractor.safetensors, part-00000.safetensors ...
                                    (one per data shard): partition features, computed once per
                                    dataset and extractor settings, reused by every partitioning
    partitions/                     MANIFEST.json, assignments.parquet, centroids.safetensors
    text_encoder/                   a tiny text encoder made from the data's captions (``ddm run``,
                                    tiny_text_encoder), loaded by the text jobs from here
    experts/03/                     one training job's folder (see below)
    router/                         the router job
    monolith/                       the equal-FLOP baseline trained on all data (``ddm.train.budget``)
    monolith-small-batch/           the equal-FLOP baseline at the experts' per-model batch
    distilled/<ensemble id>/        a student distilled from one ensemble
    ensemble.json                   which exports make the ensemble (+ ensemble.<id>.json copies)
    samples/<name>/                 ``ddm sample`` outputs
    eval/<name>/, eval/classifier/  ``ddm evaluate`` outputs and its feature network
    report/                         ``ddm run``'s report
    islands/plan.json               ``ddm submit``'s plan; islands/jobs/<job>.json (+ .config.json)
    leases/<folder>/<gen>.json      who writes <folder> now (``ddm.store.lease``): one writer per folder

A training job's folder holds ``config.json`` (the job spec), ``progress.json``,
``metrics.jsonl``, ``summary.json``, ``checkpoints/step_0001000/`` (committed by a MANIFEST.json)
and ``export/`` (the EMA model as safetensors + config.json); with ``checkpoint.snapshots``, also
``snapshots/step_0000500/export/``: the EMA model at evenly spaced steps, for learning curves.
"""

from __future__ import annotations

import hashlib
import json
import re

DATA_DIR = "data"
SHARDS_DIR = "shards"
PARTITIONS_DIR = "partitions"
FEATURES_DIR = "features"
ASSIGNMENTS = "assignments.parquet"
CENTROIDS = "centroids.safetensors"
ROUTER_DIR = "router"
MONOLITH_DIR = "monolith"
SMALL_BATCH_MONOLITH_DIR = "monolith-small-batch"
ENSEMBLE_FILE = "ensemble.json"
REPORT_DIR = "report"
CLASSIFIER_DIR = "eval/classifier"
PLAN_DIR = "islands"
PLAN_FILE = f"{PLAN_DIR}/plan.json"
TEXT_ENCODER_DIR = "text_encoder"  # a tiny text encoder made by `ddm run` (RunSpec.tiny_text_encoder)

# Inside a training job's folder.
JOB_CONFIG = "config.json"
PROGRESS = "progress.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"  # event files: `tensorboard --logdir <store URL>/<job folder>/tensorboard`
CHECKPOINTS = "checkpoints"
EXPORT = "export"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
SNAPSHOTS = "snapshots"

STEP_RE = re.compile(r"^step_(\d{7,})$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_PART_RE = re.compile(r"^[A-Za-z0-9_.=+@-][A-Za-z0-9_.=+@ -]*$")


class UnsafeName(ValueError):
    """A name read from the store (a manifest entry, a field of ensemble.json, a plan, a lease
    record) that would reach outside its folder, or a digest that is not one."""


def safe_relpath(name: object, where: str) -> str:
    """``name`` if it is a safe relative POSIX path below its folder, else ``UnsafeName``.

    Safe: a non-empty string of parts made of letters, digits and ``_.=+@- `` (no part empty,
    ``.`` or ``..``, no leading ``/``, no backslash, no ``~``, no control characters, no scheme).
    Every name read from the store passes here before it touches a path or a URL; ``where`` says
    which file or field it came from, for the error.
    """
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise UnsafeName(f"{where}: {name!r} is not a file name; the store was written by something else than ddm")
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") or not _PART_RE.match(p) for p in parts):
        raise UnsafeName(
            f"{where}: the name {name!r} would reach outside its folder (absolute, '..', or odd characters); "
            "refusing to use it. Someone with write access to the store wrote it: check who did"
        )
    return name


def check_digest(value: object, where: str) -> str:
    """``value`` if it is a sha256 digest (64 lowercase hex characters), else ``UnsafeName``."""
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise UnsafeName(f"{where}: {str(value)[:80]!r} is not a sha256 digest (64 hex characters)")
    return value


LEASES_DIR = "leases"
RUN_LEASE = "run"  # the lease of a whole ``ddm run``; each stage and job also takes its own


def lease_dir(folder: str) -> str:
    """Where the lease on ``folder`` (a job folder, data/, partitions/, islands/, or RUN_LEASE) lives."""
    return f"{LEASES_DIR}/{folder.strip('/')}"


def features_dir(extractor: str, settings: dict) -> str:
    """Features of one dataset under one extractor's settings (``settings`` names the dataset)."""
    return f"{FEATURES_DIR}/{extractor}-{short_digest(settings, 8)}"


def expert_dir(partition: int) -> str:
    return f"experts/{partition:02d}"


def distilled_dir(ensemble: str) -> str:
    """A student belongs to its teacher: one folder per ensemble id."""
    return f"distilled/{ensemble}"


def snapshot_dir(run_dir: str, step: int) -> str:
    """The folder holding a job's EMA model at ``step`` as an ``export/`` (read like any export)."""
    return f"{run_dir}/{SNAPSHOTS}/{step_dir(step)}"


def samples_dir(name: str) -> str:
    return f"samples/{name}"


def eval_dir(name: str) -> str:
    return f"eval/{name}"


def curves_dir(name: str) -> str:
    return f"eval/curves/{name}"


def ensemble_copy(description: dict) -> str:
    """Where a replaced ensemble.json is kept: named by its content id, so two replaced
    ensembles never share a name however close in time they were replaced."""
    return f"ensemble.{ensemble_id(description)}.json"


def plan_job_record(job: str) -> str:
    return f"{PLAN_DIR}/jobs/{job}.json"


def plan_job_config(job: str) -> str:
    return f"{PLAN_DIR}/jobs/{job}.config.json"


def step_dir(step: int) -> str:
    return f"step_{step:07d}"


def committed_steps(checkpoints) -> list[int]:
    """Steps of the committed checkpoints under ``checkpoints`` (a Store), oldest first, from a
    fresh listing; a directory without its manifest is not a checkpoint."""
    if not checkpoints.exists(""):
        return []
    found = (STEP_RE.match(name) for name in checkpoints.list(""))
    return sorted(int(m.group(1)) for m in found if m and checkpoints.is_committed(m.group(0)))


# --- ids and digests ------------------------------------------------------------------------


def short_digest(obj, length: int = 6) -> str:
    """A short content hash of a JSON-able object (settings, descriptions) for folder names."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def ensemble_id(description: dict) -> str:
    """The content id of an ensemble description: outputs are filed under it, so samples or
    evaluations of two different ensembles never share a folder."""
    return short_digest(description, 8)


def run_id(store_url: str) -> str:
    """A run's id: the same store URL gives the same id (Ray run names, submission ids)."""
    return hashlib.sha256(store_url.encode()).hexdigest()[:8]
