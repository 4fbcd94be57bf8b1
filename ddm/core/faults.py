"""Test-only fault injection at named points of a job (checkpoint uploads, training steps), driven
by environment variables and inert without them: the fault tests and ``bench/faults.py`` kill or
pause a rank exactly there."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("ddm.checkpoint")


def fault_hook(point: str, step: int, rank: int) -> None:
    """Test-only fault injection, driven by environment variables (inert otherwise).

    DDM_FAULT=<point>:<step>[:<rank>] with a marker file DDM_FAULT_ONCE: the first time the point is
    reached the process is killed (SIGKILL), as a crash would, and never again. With
    DDM_FAULT_ACTION=pause it instead waits (at most 120 s) until the file DDM_FAULT_ONCE + ".go"
    exists, so a test can change the world (stop the S3 endpoint) at a known step. Without
    DDM_FAULT_ONCE, every process that reaches the point pauses (or is killed), each time; a pause
    then waits for the file DDM_FAULT_GO (or its 120 s).
    """
    spec = os.environ.get("DDM_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step or (len(parts) > 2 and int(parts[2]) != rank):
        return
    marker = os.environ.get("DDM_FAULT_ONCE")
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    if os.environ.get("DDM_FAULT_ACTION") == "pause":
        log.warning("fault injection: rank %d paused at %s step %d", rank, point, step)
        go = marker + ".go" if marker else os.environ.get("DDM_FAULT_GO", "")
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    log.warning("fault injection: killing rank %d at %s step %d", rank, point, step)
    os.kill(os.getpid(), 9)
