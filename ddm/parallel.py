"""Ranks and parallel axes in one place: the process group, ``ParallelState`` (dp, ep), DeepSpeed.

``ensure_process_group`` makes a world of one process when no launcher set one up, so
DeepSpeed's MoE layer, which needs torch.distributed, works in one process too.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; otherwise a torch device name."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but this machine has no CUDA GPU; use device=cpu (or auto)")
    return device


def load_deepspeed():
    """DeepSpeed, imported on first use with its accelerator chosen first (it reads DS_ACCELERATOR
    at import; on a machine without CUDA "cpu" also silences its probing)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    _answer_zero_check_from_its_list()
    return deepspeed


def _answer_zero_check_from_its_list() -> None:
    """DeepSpeed's ZeRO check of the optimizer (``is_zero_supported_optimizer``) first imports its
    Muon optimizer to add it to the supported list, and that import compiles Muon's kernels (about
    1 s in every rank of every job on a CPU core). ddm's optimizer is torch's AdamW,
    which is on the list already, so the engine asks the list first and DeepSpeed's own check only
    for an optimizer not on it (same answers). ``DDM_STARTUP_TRIMS=0`` leaves DeepSpeed as it is."""
    from deepspeed.runtime import engine
    from deepspeed.runtime.zero import utils

    if os.environ.get("DDM_STARTUP_TRIMS", "1") == "0" or getattr(engine.is_zero_supported_optimizer, "ddm", False):
        return
    check_of_deepspeed = utils.is_zero_supported_optimizer

    def check(optimizer) -> bool:
        return type(optimizer) in utils.ZERO_SUPPORTED_OPTIMIZERS or check_of_deepspeed(optimizer)

    check.ddm = True
    engine.is_zero_supported_optimizer = check


def ensure_process_group(backend: str = "gloo") -> bool:
    """Initialise a process group if none exists.

    Under torchrun / deepspeed / Ray Train the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) is used. With no launcher, a world of one process is created on
    127.0.0.1. Returns True when this call created the group (the caller then owns
    ``dist.destroy_process_group()``; torch + gloo can abort at exit without it).
    """
    if dist.is_initialized():
        return False
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))  # DeepSpeed reads it
        dist.init_process_group(backend)
    else:
        # No launcher: a world of one on loopback. Only LOCAL_RANK (which DeepSpeed asserts on) goes
        # into the environment, so child processes don't mistake this for a launcher's world.
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return True


class ParallelState:
    """Ranks and parallel axes of one island's job, read once from the launcher's environment.

    dp: data parallelism over all ranks (DeepSpeed ZeRO shards optimizer state over it).
    ep: expert parallelism of MoE layers; ranks r and r + ep_size * i hold the same MoE experts.
    """

    def __init__(self, rank: int, world_size: int, local_rank: int, ep_size: int = 1):
        if ep_size < 1 or world_size % ep_size:
            raise ValueError(f"moe.ep_size={ep_size} must divide the world size {world_size}")
        self.rank, self.world_size, self.local_rank, self.ep_size = rank, world_size, local_rank, ep_size

    @classmethod
    def current(cls, ep_size: int = 1) -> "ParallelState":
        assert dist.is_initialized(), "ensure_process_group() first"
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), ep_size)

    @property
    def dp_rank(self) -> int:
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.world_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ParallelState(rank={self.rank}, world={self.world_size}, dp={self.dp_size}, ep={self.ep_size})"
