"""One training budget, spent three ways: the ensemble and its equal-FLOP monoliths.

The paper (arXiv 2501.05450 v2, section 4.1) matches FLOPs by *dividing the global batch among the
experts*: a monolith at batch B for S steps against K experts at B/K for the same S steps, with the
router's FLOPs on the ensemble's side. Every arm's arithmetic lives here. With B and S the spec's
``expert.global_batch_size`` and ``expert.steps``, and r the router's training FLOPs counted in
steps of the model it is matched on (rounded, so FLOPs agree within one step):

``split=batch`` (the paper's protocol; what ``auto`` picks whenever a monolith is trained)
    ensemble              K experts at B/K for S steps each (+ the router); S sequential steps
    monolith              one model at B for S + r steps; the same sequential steps
    monolith-small-batch  one model at B/K for K*S + r steps (``small_batch_monolith``): the
                          experts' per-model batch and optimizer steps, but K times the sequential
                          steps, since islands run at once and one model cannot
``split=steps`` (ddm 0.2's comparison)
    ensemble              K experts at B for S steps each; S sequential steps
    monolith              one model at B for K*S + r steps

``split=auto`` is ``batch`` when the run trains a monolith, else ``steps`` (then there is nothing
to split: each expert trains at the spec's batch, as islands runs always have).

Learning curves (``curve_points`` = P): every job keeps its EMA model at P evenly spaced steps
(``checkpoint.snapshots``), so point i of every arm is the models at i/P of their steps: equal
training FLOPs across arms at every point, within a step (``ddm.eval.curves``).

As trained (``training_flops``, ``training_arms``): 3 x forward FLOPs x global batch x steps of each
job (``JobConfig.flops_per_step``), read from each job's config and export in the store. A
distillation job's teacher forwards are not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ddm.core.config import from_dict
from ddm.store import Store, layout
from ddm.train.job import JobConfig

SPLITS = ("auto", "batch", "steps")
ENSEMBLE, MONOLITH, SMALL_BATCH = "ensemble", "monolith", "monolith-small-batch"
MONOLITH_DIRS = {MONOLITH: layout.MONOLITH_DIR, SMALL_BATCH: layout.SMALL_BATCH_MONOLITH_DIR}


@dataclass(frozen=True)
class BudgetConfig:
    """How the ensemble and the equal-FLOP monoliths share one training budget (see the module doc)."""

    split: str = "auto"  # batch (the paper's: B/K per expert), steps (each expert at B; ddm 0.2), auto
    small_batch_monolith: bool = False  # with split=batch and a monolith: also the monolith at B/K for K*S steps
    curve_points: int = 0  # > 0: evaluate every arm at this many points over training (learning curves)
    curve_rules: list[str] = field(default_factory=lambda: ["top1"])  # ensemble rules on the curves

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"budget.split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.curve_points < 0:
            raise ValueError(f"budget.curve_points must be >= 0, got {self.curve_points}")
        if self.curve_points and not self.curve_rules:
            raise ValueError("budget.curve_rules is empty; name at least one ensemble rule, e.g. [top1]")

    def resolved_split(self, monolith: bool) -> str:
        return self.split if self.split != "auto" else ("batch" if monolith else "steps")


def expert_batch(expert: JobConfig, num_experts: int, split: str) -> int:
    """Each expert's global batch under ``split``; a B that does not split is refused with the fix."""
    if split != "batch":
        return expert.global_batch_size
    b = expert.global_batch_size
    unit = num_experts * expert.ray.num_workers * expert.grad_accum
    if b % unit:
        lower, upper = b - b % unit, b - b % unit + unit
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"budget.split=batch gives each of the {num_experts} experts 1/{num_experts} of "
            f"expert.global_batch_size={b}, and each expert's batch must split into ray.num_workers="
            f"{expert.ray.num_workers} x grad_accum={expert.grad_accum}; {b} is not a multiple of {num_experts} x "
            f"{expert.ray.num_workers} x {expert.grad_accum} = {unit}. Use a global batch such as {hint}, or "
            "budget.split=steps to give every expert the whole batch"
        )
    return b // unit * expert.ray.num_workers * expert.grad_accum


def _matched(template: JobConfig, batch: int, steps: float, **changes) -> JobConfig:
    """``template`` at ``batch`` for ``steps`` (rounded), its checkpoint cadence capped at its steps."""
    steps = max(1, round(steps))
    every = min(template.checkpoint.every, steps)
    return dataclasses.replace(
        template,
        global_batch_size=batch,
        steps=steps,
        checkpoint=dataclasses.replace(template.checkpoint, every=every),
        **changes,
    )


def plan(
    expert: JobConfig,
    router: JobConfig,
    num_experts: int,
    budget: BudgetConfig,
    monolith: bool,
    expert_steps: list[int] | None = None,
    own: dict[int, JobConfig] | None = None,
) -> list[JobConfig]:
    """The training jobs of one run: K experts, the router and (with ``monolith``) the equal-FLOP
    monoliths, from the template configs (store and seed already set). ``expert_steps``: each
    expert's steps (default the template's; islands may scale them by partition size);
    ``own``: another template for some experts (another size, objective or start; the monoliths keep
    the shared template)."""
    split = budget.resolved_split(monolith)
    if budget.small_batch_monolith and not (monolith and split == "batch"):
        raise ValueError(
            "budget.small_batch_monolith trains the monolith at the experts' batch B/K: it needs monolith=true and "
            f"budget.split=batch (here monolith={str(monolith).lower()}, split={split}); under split=steps the "
            "experts already train at the monolith's batch"
        )
    snapshots = budget.curve_points
    b = expert_batch(expert, num_experts, split)
    steps = expert_steps or [expert.steps] * num_experts

    def with_snapshots(c: JobConfig) -> JobConfig:  # curve points for every job, or the template's own
        if not snapshots:
            return c
        return dataclasses.replace(c, checkpoint=dataclasses.replace(c.checkpoint, snapshots=snapshots))

    experts = [
        with_snapshots(
            dataclasses.replace(
                (own or {}).get(k, expert), job="expert", partition=k, global_batch_size=b, steps=steps[k]
            )
        )
        for k in range(num_experts)
    ]
    router = with_snapshots(dataclasses.replace(router, job="router"))
    out = [*experts, router]
    if not monolith:
        return out
    ensemble_flops = sum(c.flops_per_step() * c.steps for c in out)
    mono = with_snapshots(dataclasses.replace(expert, job="expert", partition=-1, folder=""))
    big = dataclasses.replace(mono, global_batch_size=expert.global_batch_size)
    out.append(_matched(big, big.global_batch_size, ensemble_flops / big.flops_per_step()))
    if budget.small_batch_monolith:
        small = dataclasses.replace(mono, global_batch_size=b, folder=layout.SMALL_BATCH_MONOLITH_DIR)
        out.append(_matched(small, b, ensemble_flops / small.flops_per_step()))
    return out


def arm_of(cfg: JobConfig) -> str:
    """The arm a training job belongs to."""
    if cfg.kind == "monolith":
        return SMALL_BATCH if cfg.run_dir == layout.SMALL_BATCH_MONOLITH_DIR else MONOLITH
    return ENSEMBLE if cfg.job in ("expert", "router") else cfg.kind


def arms(trained: list[tuple[JobConfig, int]]) -> dict[str, dict]:
    """Per arm, from the jobs as trained (config, steps reached): training FLOPs, global batch (the
    samples of one sequential step over the arm's velocity models), per-model batch, optimizer
    steps (summed over the arm's velocity models), and the sequential steps a user waits for when
    every island runs at once (the longest job, the router included)."""
    out: dict[str, dict] = {}
    for cfg, steps in trained:
        arm = arm_of(cfg)
        if arm not in (ENSEMBLE, MONOLITH, SMALL_BATCH):
            continue
        a = out.setdefault(
            arm, {"training_flops": 0.0, "models": 0, "global_batch": 0, "per_model_batch": [], "optimizer_steps": 0}
        )
        a["training_flops"] += cfg.flops_per_step() * steps
        a["sequential_steps"] = max(a.get("sequential_steps", 0), steps)
        if cfg.job == "router":
            a["router_flops"] = cfg.flops_per_step() * steps
            a["router_steps"] = steps
            continue
        a["models"] += 1
        a["global_batch"] += cfg.global_batch_size
        a["per_model_batch"].append(cfg.global_batch_size)
        a["optimizer_steps"] += steps
    for a in out.values():
        batches = set(a["per_model_batch"])
        a["per_model_batch"] = batches.pop() if len(batches) == 1 else sorted(batches)
    if ENSEMBLE in out:
        for name, a in out.items():
            a["flops_over_ensemble"] = a["training_flops"] / out[ENSEMBLE]["training_flops"]
    return out


def describe(arms_table: dict[str, dict]) -> list[str]:
    """The arms as a markdown table (for reports)."""
    lines = [
        "| arm | models | global batch | per-model batch | optimizer steps | sequential steps | training FLOPs | "
        "vs ensemble |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms_table.items():
        ratio = a.get("flops_over_ensemble")
        lines.append(
            f"| {name} | {a['models']} | {a['global_batch']} | {a['per_model_batch']} | {a['optimizer_steps']} | "
            f"{a['sequential_steps']} | {a['training_flops']:.3g} | {'' if ratio is None else f'{ratio:.4f}x'} |"
        )
    return lines


# --- as trained: read from the store ------------------------------------------------------------
def job_training_flops(store: Store, run_dir: str) -> float | None:
    """Training FLOPs of the job in ``run_dir`` up to its export (None when its config is missing)."""
    run = store.child(run_dir)
    if not run.exists(layout.JOB_CONFIG) or not run.is_committed(layout.EXPORT):
        return None
    cfg = from_dict(JobConfig, run.read_json(layout.JOB_CONFIG))
    return cfg.flops_per_step() * int(run.manifest(layout.EXPORT)["step"])


def trained_jobs(store: Store, run_dirs: list[str]) -> list[tuple]:
    """(JobConfig, step of its export) of each job folder that has both (in the given order)."""
    out = []
    for run_dir in run_dirs:
        run = store.child(run_dir)
        if run.exists(layout.JOB_CONFIG) and run.is_committed(layout.EXPORT):
            cfg = from_dict(JobConfig, run.read_json(layout.JOB_CONFIG))
            out.append((cfg, int(run.manifest(layout.EXPORT)["step"])))
    return out


def training_arms(store: Store, ensemble: dict, single_models: dict[str, str]) -> dict:
    """The budget of each arm as trained (``arms``): training FLOPs, global and per-model
    batch, optimizer steps and sequential steps of the ensemble and of each monolith."""
    dirs = [e["dir"] for e in ensemble["experts"]] + [ensemble["router"]["dir"]] + list(single_models.values())
    return arms(trained_jobs(store, dirs))


def training_flops(store: Store, ensemble: dict, single_models: dict[str, str]) -> dict:
    """Training FLOPs of the ensemble arm (its experts and router) and of each one-model baseline
    (``single_models``: name -> run dir), and each baseline's ratio to the ensemble's."""
    experts = [job_training_flops(store, e["dir"]) for e in ensemble["experts"]]
    router = job_training_flops(store, ensemble["router"]["dir"])
    parts = [*experts, router]
    total = None if any(v is None for v in parts) else float(sum(parts))
    out = {"ensemble": {"experts": experts, "router": router, "total": total}}
    for name, run_dir in single_models.items():
        flops = job_training_flops(store, run_dir)
        out[name] = {"total": flops, "ratio_to_ensemble": flops / total if flops and total else None}
    return out
