"""The spec of one training job, and its checks against the store. No torch here.

A job is one of four kinds, each trained by the same loop with its own objective
(``ddm.train.objectives``): an **expert** (velocity on one partition), a **monolith** (an expert
with ``partition=-1``: velocity on all data), the **router** (p(partition | x_t, t, c) on all data)
and a **distill** student (the ensemble's velocity). ``JobConfig`` is saved as ``config.json`` in
the job's folder; a re-run resumes the job and may change only how long, how often and where it
trains (``RESUMABLE``). Sections belong to the component that reads them: ``ray`` to the Ray
launcher, ``checkpoint`` to the checkpointer, ``engine`` to the DeepSpeed engine.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ddm.core.config import from_dict, to_dict
from ddm.models.config import FlowConfig, ModelConfig, forward_flops
from ddm.store import Store, StoreError, absolute_url, layout

JOBS = ("expert", "router", "distill")
FOLDER_RE = re.compile(r"^monolith-[A-Za-z0-9_-]+$")

# Dotted fields a re-run may change without changing what is being trained (how long, how often,
# where, on how many workers: checkpoints reshard to another worker count, ``ddm.checkpoint.reshard``).
RESUMABLE = frozenset(
    {
        "ray.num_workers",
        "grad_accum",
        "store",
        "steps",
        "log_every",
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.export_every",
        "checkpoint.snapshots",
        "engine.compile",
        "ray.cpus_per_worker",
        "ray.use_gpu",
        "ray.gpus_per_worker",
        "ray.max_failures",
        "threads",
    }
)


@dataclass(frozen=True)
class RayConfig:
    """Where the workers run (Ray Train); ``num_workers`` is also the job's world size."""

    num_workers: int = 1
    cpus_per_worker: int = 1  # Ray gives each worker this many CPUs (and torch as many threads)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu: 1, or a fraction (0.5) for one-worker jobs sharing a GPU
    max_failures: int = 3  # Ray restarts the workers this often; each restart resumes from the store

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be > 0, got {self.gpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker > 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker}: a worker is one rank and uses one GPU; for more GPUs "
                "raise num_workers"
            )
        if self.use_gpu and self.gpus_per_worker < 1 and self.num_workers > 1:
            raise ValueError(
                f"gpus_per_worker={self.gpus_per_worker} with num_workers={self.num_workers}: Ray may put two "
                "workers of this job on one GPU, which NCCL refuses; a fraction is for one-worker jobs sharing a "
                "GPU with other jobs. Use gpus_per_worker=1"
            )
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class CheckpointConfig:
    """How often the full training state is committed to the store, and how many commits stay."""

    every: int = 500
    keep: int = 3
    export_every: int = 0  # 0: export the EMA model at the end only
    # > 0: keep the EMA model at this many evenly spaced steps (snapshots/step_N/export/), the
    # points of learning curves (ddm.train.budget.snapshot_steps); they are never pruned.
    snapshots: int = 0

    def __post_init__(self) -> None:
        if self.snapshots < 0:
            raise ValueError(f"snapshots must be >= 0, got {self.snapshots}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        if self.export_every < 0:
            raise ValueError(f"export_every must be >= 0, got {self.export_every}")

    def snapshot_steps(self, steps: int) -> list[int]:
        """The steps at which a job of ``steps`` steps keeps its EMA model: round(i * steps / snapshots)
        for i = 1..snapshots, without repeats (so the points of every arm sit at the same shares of
        their training, hence at equal FLOPs across arms of one budget)."""
        n = self.snapshots
        return sorted({max(1, round(i * steps / n)) for i in range(1, n + 1)}) if n else []


@dataclass(frozen=True)
class EngineConfig:
    """The DeepSpeed engine inside each island.

    precision: bf16 runs the forward under bf16 autocast with fp32 weights, fp32 optimizer state and
        an fp32 EMA (DeepSpeed's ``torch_autocast``); losses are computed in fp32. auto: bf16 on GPU,
        fp32 on CPU (whose numbers then match a plain fp32 loop).
    compile: torch.compile the model through the engine; None (the default): on GPU only (and
        not for MoE models).
    reduce_dtype: the dtype ZeRO reduces gradients in (and ZeRO-3 gathers weights in) under bf16:
        fp32 (default: exact sums, twice the traffic) or bf16 (DeepSpeed's torch_autocast default
        for Linear and Conv weights: half the traffic, gradients rounded before they are summed).
    """

    zero_stage: int = 2
    precision: str = "auto"
    compile: bool | None = None
    reduce_dtype: str = "fp32"
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed settings, merged last

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.reduce_dtype not in ("fp32", "bf16"):
            raise ValueError(f"reduce_dtype must be fp32 or bf16, got {self.reduce_dtype!r}")


# ddm 0.1 kept every setting at the top level; its config.json files, islands plans and specs
# still load, their fields moved into the sections.
_MOVED = {
    "num_workers": "ray",
    "cpus_per_worker": "ray",
    "use_gpu": "ray",
    "max_failures": "ray",
    "checkpoint_every": ("checkpoint", "every"),
    "keep_checkpoints": ("checkpoint", "keep"),
    "export_every": "checkpoint",
    "zero_stage": "engine",
    "precision": "engine",
    "deepspeed": "engine",
}


@dataclass(frozen=True)
class JobConfig:
    """Everything one training job needs; saved as JSON beside its checkpoints and exports."""

    store: str = "runs/digits"  # run root URL (local path, file://, s3://, memory:// for tests)
    job: str = "expert"  # expert | router | distill (see the module doc)
    partition: int = 0  # the expert's partition; -1 trains on all data (a monolith)
    teacher: str = ""  # distill jobs: the id of the ensemble distilled (empty: the store's current one)
    folder: str = ""  # a monolith's folder when it is not monolith/ (ddm.train.budget: monolith-small-batch)
    # Start from pretrained weights instead of random ones: a ddm export (a run folder of this store,
    # monolith or experts/02, or the URL of one in another: s3://bucket/run/monolith), a
    # facebookresearch/DiT checkpoint file, a diffusers DiT folder or hf://<repo> (docs/experts.md).
    # The weights' URL and sha256 go into the export and the summary; a resumed job continues from
    # its checkpoints as always.
    init_from: str = ""
    model: ModelConfig = field(default_factory=lambda: ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10))
    flow: FlowConfig = field(default_factory=FlowConfig)
    steps: int = 1000
    global_batch_size: int = 64  # = micro_batch_size x grad_accum x data-parallel ranks
    grad_accum: int = 1
    lr: float = 1e-4  # the paper: constant 1e-4, no warm-up
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # the paper's; warmed up so short runs are usable
    log_every: int = 50
    seed: int = 0
    # torch threads per process. 0: a Ray Train worker takes ray.cpus_per_worker (the CPUs Ray
    # reserved for it), a process without Ray the CPUs it may run on divided by the ranks on its
    # machine (LOCAL_WORLD_SIZE under torchrun). Jobs side by side without Ray: set it (threads=1).
    threads: int = 0
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: from the CPUs the job is given), got {self.threads}")
        for name in ("steps", "global_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {list(JOBS)}, got {self.job!r}")
        if self.partition < -1:
            raise ValueError(f"partition must be >= 0 (or -1 for all data), got {self.partition}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.global_batch_size % (self.grad_accum * self.ray.num_workers):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by grad_accum={self.grad_accum} x "
                f"ray.num_workers={self.ray.num_workers}; pick sizes that multiply out"
            )
        moe = self.model.moe
        if moe.enabled and self.ray.num_workers % moe.ep_size:
            raise ValueError(f"model.moe.ep_size={moe.ep_size} must divide ray.num_workers={self.ray.num_workers}")
        if self.folder and (self.job != "expert" or self.partition != -1 or not FOLDER_RE.match(self.folder)):
            raise ValueError(
                f"folder={self.folder!r}: only a monolith (job=expert, partition=-1) may name its folder, "
                "monolith-<name> of letters, digits, '-' or '_' (e.g. monolith-small-batch)"
            )
        if moe.enabled and self.engine.zero_stage == 3:
            raise ValueError(
                "model.moe with engine.zero_stage=3: DeepSpeed does not run its MoE layer under ZeRO-3 "
                "(0.19: 'Native DeepSpeed MoE is not supported with ZeRO Stage 3'); use engine.zero_stage=1 or 2"
            )
        if self.model.learn_sigma and (self.job != "expert" or self.flow.prediction != "epsilon"):
            raise ValueError(
                "model.learn_sigma is a DDPM expert's variance head: an expert job with flow.path=vp and "
                f"flow.prediction=epsilon (here job={self.job}, flow.prediction={self.flow.prediction})"
            )
        if self.job == "distill" and self.flow.prediction != "velocity":
            raise ValueError(
                "a distilled student regresses the ensemble's velocity: give it a flow-matching flow "
                "(flow.path=linear or cosine, flow.prediction=velocity)"
            )
        if self.job in ("router", "distill") and moe.enabled:
            raise ValueError(f"{self.job} models are dense here: set model.moe.num_experts=0 for a {self.job} job")

    @staticmethod
    def upgrade_fields(data: dict) -> dict:
        """``data`` with ddm 0.1's top-level fields moved into their sections (called by from_dict)."""
        if not any(key in data for key in _MOVED):
            return data
        out = {k: v for k, v in data.items() if k not in _MOVED}
        for key, where in _MOVED.items():
            if key in data:
                section, name = where if isinstance(where, tuple) else (where, key)
                out[section] = {**out.get(section, {}), name: data[key]}
        return out

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.grad_accum * self.ray.num_workers)

    @property
    def kind(self) -> str:
        """expert, monolith, router or distill: what the job trains."""
        return "monolith" if self.job == "expert" and self.partition == -1 else self.job

    @property
    def run_dir(self) -> str:
        """Where this job's checkpoints, exports and metrics live, relative to the store root."""
        if self.job == "router":
            return layout.ROUTER_DIR
        if self.job == "distill":
            if not self.teacher:
                raise ValueError("a distill job needs its teacher's ensemble id: call with_teacher(cfg) first")
            return layout.distilled_dir(self.teacher)
        if self.partition == -1:
            return self.folder or layout.MONOLITH_DIR
        return layout.expert_dir(self.partition)

    @property
    def data_partition(self) -> int | None:
        """The partition the job reads (None: all data, for the router, a monolith and a student)."""
        return None if self.job != "expert" or self.partition == -1 else self.partition

    def flops_per_step(self) -> float:
        """Training FLOPs of one optimizer step: 3x the forward (forward + backward) x the global batch."""
        return 3.0 * forward_flops(self.model, router=self.job == "router") * self.global_batch_size


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("checkpoint", "engine", "ray"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> str:
    """The fields a re-run may not change that differ between two job configs (as dicts, either
    format), as "field: old -> new"; empty when the new config resumes the old job."""
    old, new = (_flat(to_dict(from_dict(JobConfig, d))) for d in (old, new))
    changed = sorted(k for k in new if k not in RESUMABLE and old.get(k) != new[k])
    return "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)


def check_inputs(cfg: JobConfig) -> dict:
    """Validate the job against the store before any worker starts; returns the dataset manifest."""
    from ddm.data.shards import Dataset  # numpy and pyarrow: only where a job is checked, not where it is read

    store = Store(cfg.store)
    store.check_reachable()
    dataset = Dataset(store)
    if tuple(dataset.sample_shape) != cfg.model.data_shape:
        raise ValueError(
            f"model.data_shape {cfg.model.data_shape} does not match the dataset's samples "
            f"{tuple(dataset.sample_shape)}"
        )
    if cfg.model.num_classes and cfg.model.num_classes != dataset.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {dataset.num_classes} classes")
    if cfg.model.text.enabled:
        from ddm.models.text_encoder import check_job  # torch: the job spec itself imports none (``ddm --help``)

        check_job(cfg.model.text, dataset, cfg.store)
    if cfg.job == "distill":
        _check_teacher(store, cfg)
    if cfg.init_from:  # the weights the job starts from are there (read by the job itself)
        from ddm.models.pretrained import check_source  # torch: the job spec itself imports none (``ddm --help``)

        check_source(cfg.init_from, store)
    config_path = f"{cfg.run_dir}/{layout.JOB_CONFIG}"
    if store.exists(config_path):  # a re-run resumes: it must train the same thing
        diffs = config_changes(store.read_json(config_path), to_dict(cfg))
        if diffs:
            raise ValueError(
                f"{cfg.store}/{cfg.run_dir} was started with other settings ({diffs}); a re-run resumes that job and "
                f"may change only {sorted(RESUMABLE - {'store'})}. Use another store or delete {cfg.run_dir}/ to "
                "start over"
            )
    if cfg.job == "router" or cfg.partition >= 0:
        if not store.is_committed(layout.PARTITIONS_DIR):
            raise ValueError(f"{cfg.store} has no committed partitions: run `ddm partition {cfg.store}` first")
        k = store.manifest(layout.PARTITIONS_DIR)["num_partitions"]
        if cfg.job == "expert" and cfg.partition >= k:
            raise ValueError(f"partition {cfg.partition} does not exist: {cfg.store} has partitions 0..{k - 1}")
    return dataset.manifest


def resolve(cfg: JobConfig) -> JobConfig:
    """The job as it runs anywhere: an absolute store URL (workers run in other directories) and,
    for a distill job, the id of the ensemble it distils."""
    return with_teacher(dataclasses.replace(cfg, store=absolute_url(cfg.store)))


def is_finished(cfg: JobConfig) -> bool:
    """Whether the job's export exists at its final step (nothing left to train). An unreadable
    export counts as missing: the job runs again, resumes from its last commit and exports anew."""
    run = Store(cfg.store).child(cfg.run_dir)
    if not run.is_committed(layout.EXPORT):
        return False
    try:
        return run.manifest(layout.EXPORT).get("step") == cfg.steps
    except StoreError:  # unreadable, or a late write of a writer that lost its lease: not finished
        return False


def _teacher_description(store: Store, cfg: JobConfig) -> dict:
    if not store.exists(layout.ENSEMBLE_FILE):
        raise ValueError(f"distillation needs the ensemble as teacher: run `ddm assemble {cfg.store}` first")
    from ddm.ensemble.assemble import read_ensemble  # torch: the job spec itself imports none (``ddm --help``)

    return read_ensemble(store)  # parsed and checked: one error naming the file, a newer ddm's refused


def with_teacher(cfg: JobConfig) -> JobConfig:
    """A distill job bound to the store's current ensemble (other jobs are returned unchanged)."""
    if cfg.job != "distill" or cfg.teacher:
        return cfg
    return dataclasses.replace(cfg, teacher=layout.ensemble_id(_teacher_description(Store(cfg.store), cfg)))


def _check_teacher(store: Store, cfg: JobConfig) -> None:
    """Distillation reads the assembled ensemble; the student must model the same data."""
    desc = _teacher_description(store, cfg)
    text, t = desc.get("text"), cfg.model.text
    mine = {"encoder": t.encoder, "dim": t.dim, "length": t.length} if t.enabled else None
    if text != mine:
        fix = "leave model.text.encoder empty (the ensemble is class-conditional)"
        if text:
            fix = "set " + " ".join(f"model.text.{k}={text[k]}" for k in ("encoder", "dim", "length"))
        student = "with " + str(mine) if mine else "reads none"
        raise ValueError(f"the ensemble reads captions with {text} but the student {student}: {fix}")
    if cfg.teacher != layout.ensemble_id(desc):
        raise ValueError(
            f"teacher={cfg.teacher!r} is not the store's ensemble ({layout.ensemble_id(desc)}, assembled from other "
            "exports); leave teacher empty to distil the current one"
        )
    if tuple(desc["data_shape"]) != cfg.model.data_shape or int(desc["num_classes"]) != cfg.model.num_classes:
        raise ValueError(
            f"the student (data_shape {cfg.model.data_shape}, {cfg.model.num_classes} classes) does not match the "
            f"ensemble (data_shape {tuple(desc['data_shape'])}, {desc['num_classes']} classes)"
        )
    if desc["flow"]["path"] != cfg.flow.path:
        raise ValueError(
            f"the ensemble's experts follow the {desc['flow']['path']!r} path; set flow.path={desc['flow']['path']}"
        )
