"""Local scratch space of checkpoint snapshots: where a rank writes a snapshot before its upload
(memory-backed when it can be), and the sweep of what killed jobs left behind."""

from __future__ import annotations

import logging
import os
import shutil

log = logging.getLogger("ddm.checkpoint")

SCRATCH_PREFIX = "ddm-ckpt-"


def sweep_stale_scratch(root: str) -> None:
    """Remove the scratch folders of checkpoint managers whose process is gone (killed jobs)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not name.startswith(SCRATCH_PREFIX) or not pid.isdigit() or _alive(int(pid)):
            continue
        log.info("removing the scratch space of a process that is gone: %s", os.path.join(root, name))
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_root() -> str | None:
    """Where snapshots are written before upload: $DDM_SCRATCH_DIR, else memory-backed /dev/shm when
    it is writable and roomy (the synchronous part of a save is then a memory copy, not a disk write;
    containers often mount a /dev/shm of 64 MB), else the system's temp directory."""
    if os.environ.get("DDM_SCRATCH_DIR"):
        return os.environ["DDM_SCRATCH_DIR"]
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= 16 * 2**30:
        return shm
    return None
