"""A training job's export: its EMA model as safetensors + JSON under ``export/``, committed by a
manifest, in the format ``ddm.models.exports`` reads (every rank calls ``write_export``)."""

from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist
from safetensors.torch import save as save_safetensors

from ddm.core.config import to_dict
from ddm.distributed.parallel import ParallelState, expert_index, shift_expert
from ddm.models.config import architecture, flow_description
from ddm.models.exports import EXPORT_FORMAT
from ddm.store import layout
from ddm.store.store import Store
from ddm.train.job import JobConfig

log = logging.getLogger("ddm.train.export")


def write_export(
    run: Store,
    weights: dict[str, torch.Tensor],
    cfg: JobConfig,
    ps: ParallelState,
    step: int,
    extra: dict | None = None,
) -> None:
    """The EMA model as safetensors + config.json under ``export/``, committed by a manifest.

    With expert parallelism each rank holds some MoE experts; their weights are gathered to rank 0
    (from the first ep ranks only) under global expert indices, so the export is one complete
    model. Every rank must call this.
    ``extra`` goes into config.json (a router's ``num_partitions``).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    ep = cfg.model.moe.ep_size if cfg.model.moe.enabled else 1
    if ep > 1:
        first = ps.ep_rank * (cfg.model.moe.num_experts // ep)
        mine = {shift_expert(n, first): t for n, t in state.items() if expert_index(n) is not None}
        # To rank 0 only, and only from ranks 0..ep-1 (they hold every expert once): an all-gather
        # would copy every expert to every rank (a DiT-XL MoE of 8 experts on 64 GPUs: ~38 GB each).
        gathered: list | None = [None] * ps.world_size if ps.is_main else None
        dist.gather_object(mine if ps.rank < ep else {}, gathered, dst=0)
        if ps.is_main:
            state = {k: v for k, v in state.items() if expert_index(k) is None}
            for part in gathered[:ep]:
                state.update(part)
    if not ps.is_main:
        return
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:  # the trainer stops before this; anything else that exports must not publish them
        raise ValueError(
            f"not exporting {run.url}: {len(nonfinite)} tensors are not finite (e.g. {nonfinite[:3]}); the model "
            "diverged. Lower lr (or check the data) and train it again"
        )
    extra = extra or {}
    config = {
        "kind": "ddm.export",
        "format_version": EXPORT_FORMAT,
        "job": cfg.job,
        "model": to_dict(cfg.model),
        "flow": to_dict(cfg.flow),
        # Self-describing: enough to rebuild and sample the network without ddm (examples/plain_dit.py).
        "architecture": architecture(cfg.model, extra.get("num_partitions") if cfg.job == "router" else None),
        "probability_path": flow_description(cfg.flow),
        "step": step,
        "partition": cfg.data_partition,
        "ema_decay": cfg.ema_decay,
    }
    if cfg.job == "distill":
        config["teacher"] = cfg.teacher
    config.update(extra)
    weights_bytes = save_safetensors(state, metadata={"step": str(step)})
    known = {
        layout.EXPORT_WEIGHTS: run.write_hashed(f"{layout.EXPORT}/{layout.EXPORT_WEIGHTS}", weights_bytes),
        layout.EXPORT_CONFIG: run.write_hashed(
            f"{layout.EXPORT}/{layout.EXPORT_CONFIG}", json.dumps(config, indent=2, allow_nan=False).encode()
        ),
    }
    run.commit(
        layout.EXPORT,
        list(known),
        meta={"kind": "ddm.export", "format_version": EXPORT_FORMAT, "step": step},
        known=known,
    )
    log.info("exported the EMA model of %s at step %d", cfg.run_dir, step)
