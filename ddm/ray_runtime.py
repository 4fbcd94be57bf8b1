"""The Ray runtime a command works in: connected to a cluster (``--address``) or to a local runtime
this process starts, for one block. The data stage, ``ddm run`` and ``ddm train`` share it."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def ray_cluster(address: str | None = None, needed: bool = True, **kwargs):
    """Connected to the Ray cluster at ``address`` (or a local Ray runtime, no dashboard) for the
    block; a connection or runtime this opened is closed when the block ends, however it ends."""
    import ray

    started = needed and not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, **kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
