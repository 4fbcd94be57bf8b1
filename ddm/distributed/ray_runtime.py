"""The Ray runtime a command works in: connected to a cluster (``--address``) or to a local runtime
this process starts, for one block. The data stage, ``ddm run`` and ``ddm train`` share it.

Ray Train's own defaults are tuned for long jobs on clusters; ddm changes three of them, and a
variable already set in the environment always wins:

- ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5`` on every cluster (Ray: 2 s). Ray Train's controller
  polls its workers at this interval, and each phase of a job's start and end waits for a poll:
  measured on 2 CPU cores, a trivial 2-worker job from ``fit()`` to its end took 13.3 s at 2 s and
  9.6 s at 0.5 s (``bench/startup.py``). A poll is one small RPC per worker.
- On a local runtime this process starts (no cluster named), ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``
  (it watches for cloud nodes being reclaimed; one more process per job) and
  ``RAY_TRAIN_METRICS_ENABLED=0`` (Prometheus metrics that nothing scrapes without a dashboard).

and, for jobs that give Ray Train no Ray Datasets (every ddm job: the workers read the store
themselves), ``trainer_class`` leaves out Ray Train's datasets callback, which starts a
DatasetManager actor for every run whether it has datasets or not: one more process importing Ray
Data while the workers start (about 1.5 s of a 2-worker job's start on 2 cores, ``bench/startup.py``).
It also leaves out Ray Train's placement-group cleaner: a detached actor per run (one more process
importing Ray Train while the workers start, and a wait of about 1 s for it to stop at the run's
end) that frees the run's placement group if its controller dies without cleaning up. Without it,
such a group is freed when the job's driver ends: the ``ddm train`` process, the islands job, or
``ddm run`` (whose other jobs would wait for the CPUs it holds until then). A trivial 2-worker run,
``fit()`` to its end on 2 cores: 8.6 s with the cleaner, 7.3 s without (three runs each).
``DDM_STARTUP_TRIMS=0`` turns these and the deferred compilation of DeepSpeed's Muon kernels
(``ddm.distributed.parallel.load_deepspeed``) off, to compare with Ray's and DeepSpeed's own behaviour or to
rule them out.

A local runtime listens on 127.0.0.1 only (``loopback_node``): nothing on the network can reach
its GCS, raylet, agents or workers, token authentication or not. Connecting to a cluster through
Ray Client (``ray://host:10001``) with Ray's token on (``RAY_AUTH_MODE=token``) is refused where the
token would cross the network in the clear (``ddm.core.secrets.check_token_transport``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ddm.core.secrets import check_token_transport, ray_token_auth

TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def trims() -> bool:
    """Whether ddm's start-up trims are on (``DDM_STARTUP_TRIMS``, default 1)."""
    return os.environ.get("DDM_STARTUP_TRIMS", "1") != "0"


def trims_env() -> dict[str, str]:
    """``DDM_STARTUP_TRIMS`` as this process has it, for a job's workers: they run in Ray's
    processes, whose environment is the runtime's, not the submitting command's."""
    value = os.environ.get("DDM_STARTUP_TRIMS")
    return {} if value is None else {"DDM_STARTUP_TRIMS": value}


def trainer_class():
    """Ray Train's ``TorchTrainer`` without its placement-group cleaner, and without its datasets
    callback when the run has no datasets (module doc). The callback list is Ray Train's internals:
    where they differ from Ray 2.60's, the plain ``TorchTrainer`` is returned."""
    from ray.train.torch import TorchTrainer

    if not trims():
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            dropped = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, dropped)]

    return Trainer


def train_env(local: bool = False) -> None:
    """ddm's Ray Train settings (module doc) into this process's environment, where unset. Ray
    Train hands them from the process that calls ``fit()`` to its controller; a local runtime's
    processes inherit them from the process that starts it."""
    for k, v in {**TRAIN_ENV, **(LOCAL_TRAIN_ENV if local else {})}.items():
        os.environ.setdefault(k, v)


@contextmanager
def loopback_node():
    """While open, a Ray runtime started in this process takes 127.0.0.1 as its node address, and
    its GCS, raylet, agents and workers listen there only.

    Ray 2.60 on Linux turns a loopback node address (``_node_ip_address="127.0.0.1"``, ``ray start
    --node-ip-address=127.0.0.1``) into the machine's interface address, and its processes then
    listen on that address or on every interface. It keeps 127.0.0.1 only where it takes
    multi-node clusters to be off (``ray_constants.ENABLE_RAY_CLUSTER``, which
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` sets when Ray is imported: off on macOS and Windows).
    ddm's local runtime is one node, so the flag is off while ``ray.init`` starts it: Ray passes the
    node address to every process it starts, and workers started later are given it by the
    raylet. Where a Ray version lacks the flag, nothing changes."""
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if before is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


@contextmanager
def ray_cluster(address: str | None = None, needed: bool = True, **kwargs):
    """Connected to the Ray cluster at ``address`` (or a local Ray runtime on 127.0.0.1, no
    dashboard) for the block; a connection or runtime this opened is closed when the block ends,
    however it ends."""
    import ray

    started = needed and not ray.is_initialized()
    if started:
        # A Ray Client address (ray://) is how a machine outside a cluster reaches it: Ray's token
        # would cross that network. A GCS address (host:6379, or RAY_ADDRESS, which Ray sets for job
        # drivers) joins the cluster's own network, whose nodes exchange the token as plainly.
        if address and address.startswith("ray://") and ray_token_auth():
            check_token_transport(address, "--address")
        target = address or os.environ.get("RAY_ADDRESS")
        local = not target or target == "local"
        train_env(local=local)
        if local:
            with loopback_node():
                ray.init(address=address, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, include_dashboard=False, **kwargs)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
