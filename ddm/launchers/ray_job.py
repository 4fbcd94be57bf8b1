"""One training job on one Ray cluster with Ray Train.

Ray places and restarts the workers; DeepSpeed runs inside them; the training function
(``ddm.train.trainer.train``) knows nothing of Ray. Each job has one fixed run name, so running
the same command again finds the same store directory and resumes there; the store's manifests,
not Ray's checkpoint bookkeeping, decide where training continues.
"""

from __future__ import annotations

import logging
import os

import torch

from ddm import layout
from ddm.job import JobConfig
from ddm.logs import setup_logging
from ddm.store import Store
from ddm.train.trainer import train

log = logging.getLogger("ddm.ray")


def connect(address: str | None = None, **kwargs) -> None:
    """Connect to the Ray cluster at ``address``, or start a local Ray runtime (no dashboard)."""
    import ray

    ray.init(address=address, include_dashboard=False, **kwargs)


def run_name(cfg: JobConfig) -> str:
    """A stable name per job: same store + same job folder -> same name."""
    return f"ddm-{cfg.run_dir.replace('/', '-')}-{layout.run_id(cfg.store)}"


def _worker(config: dict) -> None:
    """Runs in every Ray Train worker: the plain training function on the job's dataclass."""
    import ray.train

    cfg: JobConfig = config["cfg"]
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())  # DeepSpeed reads it
    torch.set_num_threads(cfg.ray.cpus_per_worker)  # as many threads as CPUs Ray reserved
    os.environ.update(config["env"])
    setup_logging()
    train(cfg)


def run_job(cfg: JobConfig, storage_path: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Train one checked job (``check_inputs``) on the Ray cluster this process is connected to.

    ``cfg.store`` must be an absolute URL (workers run in other directories). Returns the summary
    the job wrote to the store. ``env`` sets environment variables in the workers (fault injection
    in tests).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise ValueError("not connected to a Ray cluster: call connect(address) first")
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": cfg, "env": env or {}},
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
    )
    log.info("submitting %s: %d workers%s", run_name(cfg), cfg.ray.num_workers, " with GPUs" if cfg.ray.use_gpu else "")
    trainer.fit()
    return Store(cfg.store).child(cfg.run_dir).read_json(layout.SUMMARY)
