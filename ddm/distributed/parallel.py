"""Ranks and parallel axes in one place: the process group, ``ParallelState`` (dp, ep), DeepSpeed.

``ensure_process_group`` makes a world of one process when no launcher set one up, so
DeepSpeed's MoE layer, which needs torch.distributed, works in one process too.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import socket
import sys
import threading

import torch
import torch.distributed as dist

from ddm.distributed.ray_runtime import trims

log = logging.getLogger("ddm.train")


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


def cuda_index(env: dict, assigned: list | None, count: int) -> int:
    """The index (among this process's visible CUDA devices) of the one GPU this rank uses.

    ``assigned``: the GPU ids Ray gave this worker (``ray.get_gpu_ids()``). Ray Train makes the
    union of the node's job GPUs visible to every worker, in an order of its own (on nodes of 10
    GPUs or more, "0,1,10,11,2,..."), so a worker's GPU is its id's position in that list, never
    its local rank. With several ids the first visible one is used: a rank uses one GPU. Without
    Ray: ``LOCAL_RANK`` (torchrun, deepspeed), else ``SLURM_LOCALID``, else ``RANK`` when the
    whole world fits on this node's GPUs; otherwise the rank's GPU cannot be known, and that is
    an error rather than a guess.
    """
    if assigned:
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        ids = [str(i) for i in assigned]
        if not visible:  # every device is visible: ids are indices
            index = min(int(i) for i in ids)
        else:
            missing = [i for i in ids if i not in visible]
            if missing:
                visible_s = env["CUDA_VISIBLE_DEVICES"]
                raise ValueError(f"Ray assigned GPU {missing[0]} but CUDA_VISIBLE_DEVICES={visible_s}")
            index = min(visible.index(i) for i in ids)
    elif "LOCAL_RANK" in env:
        index = int(env["LOCAL_RANK"])
    elif "SLURM_LOCALID" in env:
        index = int(env["SLURM_LOCALID"])
    elif int(env.get("WORLD_SIZE", 1)) <= count:
        index = int(env.get("RANK", 0))
    else:
        raise ValueError(
            f"RANK={env.get('RANK')} of WORLD_SIZE={env.get('WORLD_SIZE')} on a node with {count} GPUs and no "
            "LOCAL_RANK: set LOCAL_RANK (the rank's index on its node; torchrun and deepspeed set it)"
        )
    if not 0 <= index < count:
        raise ValueError(f"this rank's GPU is cuda:{index} but the process sees {count} CUDA devices")
    return index


def rank_device(use_cuda: bool, assigned: list | None = None) -> torch.device:
    """This rank's one device, chosen once (``cuda_index``), and told to DeepSpeed and torch:
    DeepSpeed places the model on ``cuda:$LOCAL_RANK`` and ZeRO-3 gathers there, so LOCAL_RANK is
    set to the chosen index (a launcher's LOCAL_RANK that names another GPU would put the model on
    one device and the batches on another)."""
    if not use_cuda:
        return torch.device("cpu")
    index = cuda_index(dict(os.environ), assigned, torch.cuda.device_count())
    os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_one_rank_per_device(device: torch.device) -> None:
    """Refuses a job two of whose ranks share one GPU (NCCL cannot run them): every rank compares
    its (host, device) with the others' (one small all-gather at the start; GPUs only)."""
    if device.type != "cuda" or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    shared = sorted({r for r, x in enumerate(everyone) if everyone.count(x) > 1})
    if shared:
        raise ValueError(
            f"ranks {shared} share one GPU ({mine[0]}): a job runs one rank per GPU. With Ray, use "
            "ray.gpus_per_worker=1; with torchrun, one process per GPU (--nproc-per-node = the node's GPUs)"
        )


def use_accelerator(device: torch.device) -> None:
    """DeepSpeed's accelerator follows the job's device: it reads ``DS_ACCELERATOR`` once, at its
    first use, so a CPU job on a GPU machine or image gets the CPU accelerator and a GPU job the
    CUDA one, whatever the environment says (an image's ``DS_ACCELERATOR=cuda`` made CPU jobs crash
    in DeepSpeed)."""
    want = "cuda" if device.type == "cuda" else "cpu"
    chosen = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(chosen, "ds_accelerator", None)
    if chosen is not None and chosen._name != want:
        raise ValueError(
            f"DeepSpeed's accelerator in this process is {chosen._name!r} but the job runs on {device}: "
            "run each job in a process of its own"
        )
    if os.environ.get("DS_ACCELERATOR", want) != want:
        log.info("DS_ACCELERATOR=%s -> %s: the job runs on %s", os.environ["DS_ACCELERATOR"], want, device)
    os.environ["DS_ACCELERATOR"] = want


_EXPERT = re.compile(r"\.deepspeed_experts\.(\d+)\.")  # a tensor of one expert of DeepSpeed's MoE layer


def expert_index(name: str) -> int | None:
    """The index of the MoE expert a tensor of DeepSpeed's MoE layer belongs to (in the rank's
    ``deepspeed_experts``, or in an export's, which holds every expert); None for any other tensor."""
    m = _EXPERT.search(name)
    return None if m is None else int(m.group(1))


def shift_expert(name: str, by: int) -> str:
    """``name`` with its MoE expert index moved by ``by``: a rank's local index to the global one
    (+ the rank's first expert) and back."""
    return _EXPERT.sub(lambda m: f".deepspeed_experts.{int(m.group(1)) + by}.", name, count=1)


def load_deepspeed():
    """DeepSpeed, imported on first use with its accelerator chosen first (it reads DS_ACCELERATOR
    at import; on a machine without CUDA "cpu" also silences its probing)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    _import_muon_compiled_on_first_use()
    return deepspeed


MUON = "deepspeed.runtime.zero.muon.muon_optimizer"
_MUON_LOCK = threading.Lock()


def _import_muon_compiled_on_first_use() -> None:
    """DeepSpeed imports its Muon optimizer in every ZeRO job, whatever the optimizer (its ZeRO
    check of the optimizer, and every gradient reduction of ZeRO-1/2), and that import wraps Muon's
    kernels in ``torch.compile``, which imports torch's compiler (Inductor): about 0.9 s on a CPU
    core in every rank of every job, before its first step (``bench/startup.py``). ddm imports
    Muon first, with each kernel's ``torch.compile`` deferred to the kernel's first call: the
    same kernels, compiled when a Muon optimizer first runs (ddm's is torch's AdamW: never).
    ``DDM_STARTUP_TRIMS=0`` leaves DeepSpeed as it is."""
    with _MUON_LOCK:  # one swap of DeepSpeed's compile at a time (ranks' threads, if any)
        if trims() and MUON not in sys.modules:
            _import_muon_deferred()


def _import_muon_deferred() -> None:
    from deepspeed.runtime import compiler

    eager = compiler.compile

    def deferred():
        def wrap(fn):
            compiled = None

            @functools.wraps(fn)
            def kernel(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = eager()(fn)
                return compiled(*args, **kwargs)

            return kernel

        return wrap

    compiler.compile = deferred  # read by Muon's module as it is imported (``@compiler.compile()``)
    try:
        importlib.import_module(MUON)
    finally:
        compiler.compile = eager


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


def all_ranks(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank of the job (one small collective; True alone without one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
