"""What sampling costs: FLOPs per sample of each rule, and of one forward of each model.

Sampling: an ensemble rule costs, per velocity evaluation, the router's forward on every sample
(the oracle rule has no router) plus the forwards of the experts each sample is routed to, each
twice with classifier-free guidance; a one-model baseline costs its forward (twice with guidance).
Counts come from the ensemble's own forward counters, FLOPs per forward from ``forward_flops``
(every matrix product, tested against torch's FLOP counter), so top-1 with a DiT-Tiny router costs
about twice what its expert forwards alone suggest, and the tables say so.

What training cost is ``ddm.train.budget``'s (``training_flops``, ``training_arms``).
"""

from __future__ import annotations

from ddm.models.config import forward_flops
from ddm.models.exports import model_config, read_export
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


def forward_flops_of(store: Store, ensemble: dict) -> dict:
    """FLOPs of one forward of each expert and of the router, and the router's size relative to
    the mean expert (the paper's router is ~4% of an expert)."""
    experts = [export_forward_flops(read_export(store, e["dir"])[0]) for e in ensemble["experts"]]
    router = export_forward_flops(read_export(store, ensemble["router"]["dir"])[0])
    return {"experts": experts, "router": router, "router_over_expert": router / (sum(experts) / len(experts))}
