"""What the models cost: sampling FLOPs per sample of each rule and the training FLOPs of each arm.

Sampling: an ensemble rule costs, per velocity evaluation, the router's forward on every sample
(the oracle rule has no router) plus the forwards of the experts each sample is routed to, each
twice with classifier-free guidance; a one-model baseline costs its forward (twice with guidance).
Counts come from the ensemble's own forward counters, FLOPs per forward from ``forward_flops``
(every matrix product, tested against torch's FLOP counter), so top-1 with a DiT-Tiny router costs
about twice what its expert forwards alone suggest, and the tables say so.

Training: 3 x forward FLOPs x global batch x steps of each job (``JobConfig.flops_per_step``),
read from each job's config and export in the store. A distillation job's teacher forwards are
not counted.
"""

from __future__ import annotations

from ddm import layout
from ddm.config import from_dict
from ddm.exports import model_config, read_export
from ddm.models.config import forward_flops
from ddm.store import Store


def export_forward_flops(export_config: dict) -> float:
    """Forward FLOPs of one sample of an export's network (a router: with its K outputs)."""
    router = export_config.get("job") == "router"
    k = export_config.get("num_partitions", 2)
    return forward_flops(model_config(export_config), router=router, num_partitions=k)


def ensemble_sampling_cost(
    expert_flops: list[float],
    router_flops: float,
    expert_evals: list[int],
    router_evals: int,
    velocity_evals: int,
    evals_per_sample: int,
) -> dict:
    """Per-sample cost of an ensemble rule from its forward counts (``ForwardStats``: expert and
    router forwards and velocity evaluations, in samples) and the FLOPs of one forward of each
    expert and of the router; ``evals_per_sample``: velocity evaluations per sample of the sampler."""
    if velocity_evals <= 0:
        raise ValueError("no velocity evaluation was counted: sample before asking what it cost")
    per_sample = evals_per_sample / velocity_evals
    experts = sum(f * n for f, n in zip(expert_flops, expert_evals, strict=True)) * per_sample
    router = router_flops * router_evals * per_sample
    return _cost(sum(expert_evals) * per_sample, router_evals * per_sample, experts, router)


def single_model_sampling_cost(model_flops: float, evals_per_sample: int, branches: int) -> dict:
    """Per-sample cost of one model: ``branches`` forwards per evaluation (2 with guidance)."""
    forwards = float(evals_per_sample * branches)
    return _cost(forwards, 0.0, forwards * model_flops, 0.0)


def _cost(expert_forwards: float, router_forwards: float, expert_flops: float, router_flops: float) -> dict:
    total = expert_flops + router_flops
    return {
        "expert_forwards_per_sample": expert_forwards,
        "router_forwards_per_sample": router_forwards,
        "sampling_flops_per_sample": total,
        "router_share": router_flops / total if total else 0.0,
    }


def job_training_flops(store: Store, run_dir: str) -> float | None:
    """Training FLOPs of the job in ``run_dir`` up to its export (None when its config is missing)."""
    from ddm.job import JobConfig  # the job module imports the training stack's config only

    run = store.child(run_dir)
    if not run.exists(layout.JOB_CONFIG) or not run.is_committed(layout.EXPORT):
        return None
    cfg = from_dict(JobConfig, run.read_json(layout.JOB_CONFIG))
    return cfg.flops_per_step() * int(run.manifest(layout.EXPORT)["step"])


def trained_jobs(store: Store, run_dirs: list[str]) -> list[tuple]:
    """(JobConfig, step of its export) of each job folder that has both (in the given order)."""
    from ddm.job import JobConfig

    out = []
    for run_dir in run_dirs:
        run = store.child(run_dir)
        if run.exists(layout.JOB_CONFIG) and run.is_committed(layout.EXPORT):
            cfg = from_dict(JobConfig, run.read_json(layout.JOB_CONFIG))
            out.append((cfg, int(run.manifest(layout.EXPORT)["step"])))
    return out


def training_arms(store: Store, ensemble: dict, single_models: dict[str, str]) -> dict:
    """The budget of each arm as trained (``ddm.budget.arms``): training FLOPs, global and per-model
    batch, optimizer steps and sequential steps of the ensemble and of each monolith."""
    from ddm.budget import arms

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


def forward_flops_of(store: Store, ensemble: dict) -> dict:
    """FLOPs of one forward of each expert and of the router, and the router's size relative to
    the mean expert (the paper's router is ~4% of an expert)."""
    experts = [export_forward_flops(read_export(store, e["dir"])[0]) for e in ensemble["experts"]]
    router = export_forward_flops(read_export(store, ensemble["router"]["dir"])[0])
    return {"experts": experts, "router": router, "router_over_expert": router / (sum(experts) / len(experts))}
