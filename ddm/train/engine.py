"""The DeepSpeed engine of a training job: its config, precision, compilation, ZeRO-3 parameter
gathering and a replica check.

DeepSpeed is imported on first use (``load_deepspeed``): it picks its accelerator at import time.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from ddm.core.config import deep_merge
from ddm.distributed.parallel import load_deepspeed
from ddm.train.job import JobConfig

log = logging.getLogger("ddm.train")


def uses_bf16(cfg: JobConfig, on_gpu: bool) -> bool:
    return cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and on_gpu)


def uses_compile(cfg: JobConfig, on_gpu: bool) -> bool:
    """``engine.compile``, by default on GPUs, except for MoE models: DeepSpeed's gating reads
    Python ints from tensors and its layer mutates ``aux_loss``, a combination no test compiles;
    ``engine.compile=true`` still asks for it."""
    if cfg.engine.compile is not None:
        return cfg.engine.compile
    return on_gpu and not cfg.model.moe.enabled


def deepspeed_config(cfg: JobConfig, on_gpu: bool) -> dict:
    """DeepSpeed's settings for the job: batch sizes, ZeRO stage, precision, then ``engine.deepspeed``.

    bf16 is DeepSpeed's ``torch_autocast``, not its ``bf16`` mode: that one casts the module's
    weights to bf16, so every fp32 tensor made inside forward (time embeddings, positions, inputs)
    meets bf16 weights, and the master weights the EMA averages would be bf16 too.
    """
    ds = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "torch_autocast": {"enabled": uses_bf16(cfg, on_gpu), "dtype": "bfloat16"}
        # Which modules' gradients ZeRO reduces in bf16 (DeepSpeed's default: Linear and Conv); none
        # unless engine.reduce_dtype=bf16.
        | ({} if cfg.engine.reduce_dtype == "bf16" else {"lower_precision_safe_modules": []}),
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # ddm logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.engine.deepspeed)


def build_engine(model: torch.nn.Module, cfg: JobConfig, on_gpu: bool):
    """A DeepSpeed engine over ``model`` with AdamW at the job's constant learning rate (torch's
    fused kernel on GPU), compiled when ``engine.compile`` says so."""
    deepspeed = load_deepspeed()
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = {"params": list(model.parameters()), "name": "params", "weight_decay": cfg.weight_decay}
    groups = split_params_into_different_moe_groups_for_optimizer(params) if cfg.model.moe.enabled else [params]
    # A torch optimizer, not a DeepSpeed "optimizer" config: that one compiles fused Adam on CPU.
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True if on_gpu else None
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, on_gpu))
    if uses_compile(cfg, on_gpu):
        engine.compile()  # torch.compile of the module; the first step pays the compilation
        log.info("the model is compiled (torch.compile) on its first step")
    return engine


def whole_params(engine, zero_stage: int):
    """A context in which every parameter is whole: ZeRO-3 shards them across ranks, so gather."""
    if zero_stage == 3:
        return load_deepspeed().zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()


def replica_check(module: torch.nn.Module, zero_stage: int) -> dict:
    """Largest difference of dense weights across ranks (0 for data parallelism done right), and
    whether MoE expert weights differ across ranks (they should under expert parallelism)."""
    load_deepspeed()
    from deepspeed.moe.utils import is_moe_param

    if dist.get_world_size() == 1 or zero_stage == 3:
        return {"dense_max_diff_across_ranks": 0.0, "expert_weights_differ_across_ranks": None}
    # Compared on the devices the weights live on (NCCL collectives need CUDA tensors).
    dense = torch.cat([p.detach().float().flatten() for p in module.parameters() if not is_moe_param(p)])
    expert = [p.detach().float().flatten() for p in module.parameters() if is_moe_param(p)]
    ref = dense.clone()
    dist.broadcast(ref, src=0)
    diff = (dense - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    out = {"dense_max_diff_across_ranks": float(diff), "expert_weights_differ_across_ranks": None}
    if expert:
        mine = torch.cat(expert)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        differs = torch.tensor([float(not torch.equal(mine, ref))], device=mine.device)
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        out["expert_weights_differ_across_ranks"] = bool(differs.item())
    return out
