"""Process-group set-up in one place.

Later issues grow this into one object with named axes (dp, ep); for now it guarantees that
DeepSpeed's MoE layer, which needs torch.distributed, also works in a world of one process.
"""

from __future__ import annotations

import os
import socket

import torch.distributed as dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        dist.init_process_group(backend)
    else:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
    return True
