"""What a resume restores beside the engine's state: the random streams a step draws from, and the
learning-rate-0 step that makes every optimizer state exist before the portable state fills it in."""

from __future__ import annotations

import logging

import torch

from ddm.checkpoint.manager import RankState
from ddm.train.job import JobConfig
from ddm.train.prefetch import to_device

log = logging.getLogger("ddm.train")


def zero_lr_step(engine, objective, reader, gen, cfg: JobConfig, device: torch.device, text_encoder=None) -> None:
    """One optimizer step at learning rate 0: every optimizer state then exists in this job's
    layout (ZeRO creates its partitions' states lazily) while the weights stay as they are; the
    reshard overwrites the states it made."""
    groups = engine.optimizer.param_groups
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
    for _ in range(cfg.grad_accum):
        batch = to_device(reader.next_batch(), device, cfg.model.num_classes, text_encoder)
        engine.backward(objective(engine, batch, gen))
        engine.step()
    for g, lr in zip(groups, lrs):
        g["lr"] = lr


def rng_state(gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random streams a step draws from: the job's noise generator, and torch's global streams
    (label dropout draws from them), the CUDA one on a GPU."""
    state = {"rng.noise": gen.get_state(), "rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(gen: torch.Generator, state: RankState, device: torch.device, reseed: int) -> None:
    torch.set_rng_state(state.tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in state.tensors:
        torch.cuda.set_rng_state(state.tensors["rng.cuda"], device)
    try:
        gen.set_state(state.tensors["rng.noise"])
    except RuntimeError:  # a CPU generator's state on a GPU, or the reverse: another kind of stream
        gen.manual_seed(reseed)
        log.warning(
            "the checkpoint's noise stream comes from another device type; reseeded: training continues, but its "
            "noise differs from an uninterrupted run on one device"
        )
