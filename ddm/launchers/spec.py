"""The spec of a whole run, which ``ddm run`` and ``ddm submit`` share, and the jobs it makes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ddm.budget import BudgetConfig, plan
from ddm.config import apply_overrides, from_dict, to_dict
from ddm.data.config import IngestConfig, PartitionConfig
from ddm.job import JobConfig
from ddm.models.config import ModelConfig
from ddm.settings import EvalConfig, SampleConfig
from ddm.store import absolute_url


@dataclass(frozen=True)
class RunSpec:
    """One experiment: where, what data, how many partitions, how each job trains, what to measure."""

    store: str = "runs/digits"
    seed: int = 0  # every training job's seed (data order, init, noise), and sampling's and evaluation's
    # unless sample.seed / evaluate.seed set them apart
    ingest: IngestConfig = field(default_factory=IngestConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    expert: JobConfig = field(default_factory=JobConfig)  # template for every expert (store, job, partition set here)
    # Experts unlike the others: partition -> overrides of the expert template for that expert alone,
    # e.g. {"2": ["model.arch=DiT-S/2"]} (an island with one small GPU), {"1": ["flow.path=vp",
    # "flow.prediction=epsilon"]} (a DDPM expert), {"0": ["init_from=monolith"]}. The budget sets
    # every expert's batch and steps. Each job's FLOPs are its own, in the budget (a monolith
    # matches their sum) and the cost tables.
    expert_overrides: dict[str, list[str]] = field(default_factory=dict)
    # The router: a DiT-Micro by default, ~5% of a DiT-Tiny expert's forward (the paper's is ~4%).
    router: JobConfig = field(default_factory=lambda: JobConfig(job="router", model=ModelConfig(arch="DiT-Micro/4")))
    monolith: bool = False  # also train one model on all data with the experts' + router's training FLOPs
    # How the ensemble and the monoliths share the budget (ddm.budget): by default, with a monolith,
    # the paper's split: expert.global_batch_size is the global batch B, each expert trains at B/K.
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    distill_steps: int = 0  # > 0: distil the ensemble into one expert-sized student for this many steps
    rule: str = "top1"  # the ensemble's default rule (ensemble.json)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    max_concurrent_jobs: int = 0  # 0: as many as the Ray cluster's CPUs hold at once
    # Jobs of one worker shape share Ray Train worker groups, one lane per slot, one job after
    # another in each (ddm.launchers.run.lanes): Ray Train's start is paid once per lane, not per job.
    reuse_workers: bool = True

    def __post_init__(self) -> None:
        if self.expert.model.text.enabled:
            raise ValueError(
                "ddm run trains class-conditional experts for now: text-conditioned ones (expert.model.text) train "
                "with `ddm train expert`, assemble with `ddm assemble` and sample with `ddm sample prompts_file=...` "
                "(their router, evaluation and the run itself come next, #24)"
            )
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.max_concurrent_jobs < 0:
            raise ValueError(f"max_concurrent_jobs must be >= 0, got {self.max_concurrent_jobs}")

    def resolved(self, store: str | None = None) -> "RunSpec":
        """The spec with an absolute store URL (``store`` replaces the spec's own) and the run's seed
        in sampling and evaluation where they do not set their own."""
        return dataclasses.replace(
            self,
            store=absolute_url(store or self.store),
            sample=self.sample.seeded(self.seed),
            evaluate=self.evaluate.seeded(self.seed),
        )


def jobs(spec: RunSpec, num_partitions: int, expert_steps: list[int] | None = None) -> list[JobConfig]:
    """The training jobs of the spec, experts first (``expert_steps``: each expert's steps, default
    the spec's), then the router, then the monoliths the budget trains (``ddm.budget.plan``)."""
    base = {"store": spec.store, "seed": spec.seed}
    expert = dataclasses.replace(spec.expert, **base)
    router = dataclasses.replace(spec.router, **base)
    own = {}
    for key, overrides in spec.expert_overrides.items():
        if not key.isdigit() or int(key) >= num_partitions:
            raise ValueError(
                f"expert_overrides names partition {key!r}; the partitions are 0..{num_partitions - 1} "
                "(e.g. expert_overrides.2=[model.arch=DiT-S/2])"
            )
        fixed = [o for o in overrides if o.split("=", 1)[0] in PLANNED]
        if fixed:
            raise ValueError(
                f"expert_overrides.{key} sets {', '.join(fixed)}: the run's budget sets each expert's "
                f"{', '.join(PLANNED)}; change them for every expert in the spec"
            )
        try:
            own[int(key)] = from_dict(JobConfig, apply_overrides(to_dict(expert), list(overrides)))
        except ValueError as e:
            raise ValueError(f"expert_overrides.{key}: {e}") from e
    return plan(expert, router, num_partitions, spec.budget, spec.monolith, expert_steps, own)


PLANNED = ("store", "seed", "job", "partition", "folder", "global_batch_size", "steps")


def student(spec: RunSpec) -> JobConfig | None:
    """The distillation job of the spec (an expert-sized student), or None without ``distill_steps``."""
    if not spec.distill_steps:
        return None
    return dataclasses.replace(
        spec.expert, store=spec.store, seed=spec.seed, job="distill", partition=-1, steps=spec.distill_steps
    )
