"""Checkpoints of ddm before format 3: DeepSpeed's own files (pickles) and ddm's rank state only.

They are read without running code from the store: torch's weights-only unpickler builds tensors,
containers and three allow-listed DeepSpeed records and refuses anything else; the result is
written again locally, and only those local files are handed to DeepSpeed, whose loader unpickles
freely. Later formats hold safetensors + JSON alone (``ddm.checkpoint.manager``).
"""

from __future__ import annotations

import os
import re

from ddm.distributed.parallel import load_deepspeed
from ddm.store import ChecksumError

# The names of DeepSpeed's files that such a commit may list.
DEEPSPEED_FILE = re.compile(r"^[A-Za-z0-9_]+_states\.pt$")


def sanitize_deepspeed_files(local: str) -> None:
    """Rewrite the DeepSpeed files of a commit before format 3 from torch's weights-only load, which
    builds tensors, containers and the three DeepSpeed records below and runs nothing else: the
    files DeepSpeed then unpickles were made here, not read from the store."""
    import torch.serialization

    load_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for name in os.listdir(local):
        if not name.endswith(".pt"):
            continue
        path = os.path.join(local, name)
        try:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle's errors are many; all mean "not plain data"
            raise ChecksumError(
                f"{name} holds more than tensors and DeepSpeed's records ({str(e).splitlines()[0][:200]}); "
                "ddm does not unpickle it: someone with write access to the store may have planted code"
            ) from None
        torch.save(state, path)


def load_deepspeed_files(engine, local: str, tag: str) -> None:
    """Load the rewritten DeepSpeed files of commit ``tag`` (in ``local``) into ``engine``."""
    load_path, _ = engine.load_checkpoint(
        os.path.dirname(local), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:  # DeepSpeed found nothing to load: nothing of the engine was touched
        raise ChecksumError(f"DeepSpeed could not load checkpoint {tag}")
