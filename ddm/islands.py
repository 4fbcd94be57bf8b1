"""The Ray side: run one expert job on one island (a Ray cluster) with Ray Train.

Ray places and restarts the workers; DeepSpeed runs inside them; the training function
(``ddm.train.expert.train``) knows nothing of Ray. Each expert job has one fixed run name, so
running the same command again finds the same store directory and resumes there; the store's
manifests, not Ray's checkpoint bookkeeping, decide where training continues.
"""

from __future__ import annotations

import logging
import os

from ddm.config import from_dict, to_dict
from ddm.train.expert import TrainConfig, check_inputs

log = logging.getLogger("ddm.islands")


def run_name(cfg: TrainConfig) -> str:
    """A stable name per expert job: same store + same partition -> same name."""
    import hashlib

    digest = hashlib.sha256(cfg.store.encode()).hexdigest()[:8]
    return f"ddm-{cfg.run_dir.replace('/', '-')}-{digest}"


def _worker(config: dict) -> None:
    """Runs in every Ray Train worker: restore the typed config, then the plain training function."""
    import ray.train

    from ddm.train.expert import train

    import torch

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())  # DeepSpeed reads it
    torch.set_num_threads(int(config["cfg"].get("cpus_per_worker", 1)))  # as many threads as CPUs Ray reserved
    for key, value in config.get("env", {}).items():
        os.environ[key] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = from_dict(TrainConfig, config["cfg"])
    train(cfg)


def run_expert(cfg: TrainConfig, storage_path: str | None = None, env: dict[str, str] | None = None) -> dict:
    """Train one expert on the Ray cluster this process is connected to (``ray.init`` first).

    Inputs are checked against the store before any worker starts. Returns the summary the job
    wrote to the store. ``env`` sets environment variables in the workers (fault injection in tests).
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import dataclasses

    from ddm.store import Store, absolute_url

    cfg = dataclasses.replace(cfg, store=absolute_url(cfg.store))  # workers run in other directories
    check_inputs(cfg)
    if not ray.is_initialized():
        raise ValueError("not connected to a Ray cluster: call ray.init(address=...) first")
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": to_dict(cfg), "env": env or {}},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
    )
    log.info("submitting %s: %d workers%s", run_name(cfg), cfg.num_workers, " with GPUs" if cfg.use_gpu else "")
    trainer.fit()
    return Store(cfg.store).child(cfg.run_dir).read_json("summary.json")
