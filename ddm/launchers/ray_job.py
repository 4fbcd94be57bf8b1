"""``ddm train``: train an expert, the router or a distilled student as one Ray Train + DeepSpeed job.

Ray Train places ray.num_workers workers (a local Ray runtime by default, or --address of a
cluster) and restarts them after a failure (up to ray.max_failures; an error no restart can fix,
such as a checksum mismatch, bad input or refused credentials, ends the job at once); DeepSpeed
runs ZeRO data parallelism (and MoE expert parallelism) inside them; the training function
(``ddm.train.trainer.train``) knows nothing of Ray. Checkpoints and the EMA export go to the job's
folder in the store (experts/<k>/, router/, distilled/<ensemble id>/). Running the same command
again resumes from the newest committed checkpoint, and so do Ray's restarts: the store's
manifests, not Ray's bookkeeping, decide where training continues. A re-run may change only how
long, how often and where the job trains; other differences are refused with the fields named.
--no-ray trains in this process.

  expert   velocity of one partition (--partition k; partition=-1: all data, a monolith)
  router   p(partition | x_t, t, c) by cross-entropy on noised samples of all the data
  distill  (`ddm distill`) one dense student regressing the assembled ensemble's velocity:
           the teacher is the expert of each sample's partition; labels are dropped once for
           both, so the student keeps classifier-free guidance
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack

from ddm.core.logs import setup_logging
from ddm.distributed import ray_runtime
from ddm.store import Store, layout
from ddm.store.lease import LeaseHeld, fenced
from ddm.store.retries import retryable_job_error
from ddm.train.job import JobConfig, is_finished

# No torch or DeepSpeed at import: Ray Train's controller unpickles ``_worker`` (and so imports this
# module) in a process of its own that never trains; the workers import them in ``_worker``.
log = logging.getLogger("ddm.ray")


def run_name(cfg: JobConfig) -> str:
    """A stable name per job: same store + same job folder -> same name."""
    return f"ddm-{cfg.run_dir.replace('/', '-')}-{layout.run_id(cfg.store)}"


def _worker(config: dict) -> None:
    """Runs in every Ray Train worker: the plain training function on the job's dataclass."""
    import ray
    import ray.train

    from ddm.distributed.parallel import rank_device  # torch and DeepSpeed: in the Ray workers, not the driver
    from ddm.train.trainer import train  # torch and DeepSpeed: in the Ray workers, not the driver

    cfg: JobConfig = config["cfg"]
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())  # DeepSpeed reads it (CPU)
    os.environ["DDM_RAY_CPUS"] = str(cfg.ray.cpus_per_worker)  # train() takes as many threads (threads_for)
    os.environ.update(config["env"])
    setup_logging()
    # The GPU Ray assigned this worker, found in the node's visible list; LOCAL_RANK then names it
    # for DeepSpeed too (Ray's local rank is another number where workers have 0 or 2+ GPUs).
    device = rank_device(cfg.ray.use_gpu, ray.get_gpu_ids() if cfg.ray.use_gpu else None)
    train(cfg, report=_reporter(), device=device, lease=config["lease"])


def _reporter():
    """``ray.train.report`` of the last log window's step, loss and steps/s at each checkpoint and at
    the end, on every worker (Ray Train's report is a collective, about 2 s each in Ray 2.60: not
    every window). Each new commit is also reported, by rank 0, as a Ray
    checkpoint: a folder holding only ``ddm_checkpoint.json`` with the commit's URL and step (the
    weights stay in the store), so Ray's Result and Train state name the newest checkpoint and
    carry the metrics reported with it."""
    import json
    import tempfile

    import ray.train

    last = [None]

    def report(record: dict) -> None:
        url = record.get("checkpoint")
        if ray.train.get_context().get_world_rank() != 0 or not url or url == last[0]:
            ray.train.report(record)
            return
        with tempfile.TemporaryDirectory(prefix="ddm-ray-ckpt-") as d:
            with open(os.path.join(d, "ddm_checkpoint.json"), "w") as f:
                json.dump({"url": url, "step": record["step"]}, f)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))
        last[0] = url

    return report


def run_job(
    cfg: JobConfig,
    storage_path: str | None = None,
    env: dict[str, str] | None = None,
    force: bool = False,
    lease_wait_s: float = 0.0,
) -> dict:
    """Train one checked job (``check_inputs``) on the Ray cluster this process is connected to.

    ``cfg.store`` must be an absolute URL (workers run in other directories). This process holds the
    job folder's lease while the job runs (``force`` takes it from a live holder; ``lease_wait_s``
    waits that long for one to end); the workers write under it. Returns the summary the job wrote
    to the store, with what Ray recorded of it last (``ray_reported``: step, loss, steps/s, checkpoint).
    ``env`` sets environment variables in the workers (fault injection in tests).
    """
    import ray

    if not ray.is_initialized():
        raise ValueError("not connected to a Ray cluster: run the job inside ray_cluster(address)")
    _check_threads(cfg)
    from ddm.train.trainer import job_lease  # torch and DeepSpeed: a driver that only submits loads neither

    with job_lease(cfg, force, lease_wait_s) as token:
        try:
            fit_called_at = time.time()
            result = _fit(cfg, storage_path, _worker, {"cfg": cfg, "env": env or {}, "lease": token})
        except Exception:
            fenced(Store(cfg.store), token).fence("the job's summary", always=True)  # lost: say so, not Ray's error
            raise
    summary = Store(cfg.store).child(cfg.run_dir).read_json(layout.SUMMARY)
    # What Ray recorded with the newest checkpoint (step, loss, the commit's URL), and when the Ray
    # Train run was started (from there to the workers' train() is Ray's: placement, worker
    # processes, process group).
    return {**summary, "ray_reported": result.metrics, "fit_called_at": fit_called_at}


def _check_threads(cfg: JobConfig) -> None:
    if cfg.threads > cfg.ray.cpus_per_worker:
        raise ValueError(
            f"threads={cfg.threads} but each worker gets ray.cpus_per_worker={cfg.ray.cpus_per_worker} CPUs: "
            "raise ray.cpus_per_worker, or leave threads=0 (as many threads as CPUs)"
        )


def summary_of(cfg: JobConfig) -> dict:
    """The job's summary in the store; {} where its export was committed but its summary not (a
    crash between the two: the export is what counts as finished)."""
    try:
        return Store(cfg.store).child(cfg.run_dir).read_json(layout.SUMMARY)
    except FileNotFoundError:
        return {}


def ray_task(cfg: JobConfig, lease_wait_s: float = 0.0) -> dict:
    """One job as a Ray task (``ddm run`` runs several at once): its own TorchTrainer, workers and
    restarts. It lives here, in a module that imports no torch, so the task's process starts light.
    ``lease_wait_s``: how long to wait for the job's lease (a job a failed lane held, whose process
    may have died without releasing it)."""
    setup_logging()
    return run_job(cfg, lease_wait_s=lease_wait_s)


def ray_lane(cfgs: list[JobConfig]) -> list[dict]:
    """Several jobs as one Ray task (``run_lane``)."""
    setup_logging()
    return run_lane(cfgs)


def run_lane(cfgs: list[JobConfig], storage_path: str | None = None, env: dict[str, str] | None = None) -> list[dict]:
    """Train checked jobs of one worker shape one after another on one Ray Train worker group (a
    lane of ``ddm run``): Ray Train's controller, placement group, worker processes, their imports
    and the process group start once for all of them, not once per job. Each job keeps its own
    lease (all held for the lane), folder, checkpoints and export; a job finished before a restart
    of the lane is skipped by the restarted workers. The lane may be restarted as often as its
    jobs together allow (the sum of their ``ray.max_failures``). Returns the jobs' summaries, in
    order; a job whose lease another holder has is left out of the lane and given as
    {"refused": why}. Raises as ``run_job`` does when the lane fails (the caller finds which jobs
    finished in the store)."""
    import ray

    from ddm.train.trainer import job_lease  # torch and DeepSpeed: a driver that only submits loads neither

    if not ray.is_initialized():
        raise ValueError("not connected to a Ray cluster: run the jobs inside ray_cluster(address)")
    for c in cfgs:
        _check_threads(c)
    refused: dict[str, str] = {}
    with ExitStack() as stack:
        held, tokens = [], []
        for c in cfgs:
            try:
                tokens.append(stack.enter_context(job_lease(c)))
                held.append(c)
            except LeaseHeld as e:  # someone else trains it: the lane goes on without it
                refused[c.run_dir] = str(e)
        if held:
            try:
                config = {"cfgs": held, "env": env or {}, "leases": tokens}
                _fit(held[0], storage_path, _lane_worker, config, sum(c.ray.max_failures for c in held), "lane")
            except Exception:
                for c, token in zip(held, tokens):
                    if not is_finished(c):  # lost: say so, not Ray's error
                        fenced(Store(c.store), token).fence("the job's summary", always=True)
                raise
    return [{"refused": refused[c.run_dir]} if c.run_dir in refused else summary_of(c) for c in cfgs]


def _lane_worker(config: dict) -> None:
    """Runs in every Ray Train worker of a lane: its jobs in order, each as ``_worker`` runs one,
    from the state a fresh process would give it (no compiled graphs of the job before: TorchDynamo
    keeps them per function, and would make a later job's graphs dynamic)."""
    import gc
    import sys

    import torch
    import torch.distributed as dist

    for cfg, lease in zip(config["cfgs"], config["leases"]):
        done = [is_finished(cfg)]  # trained before Ray restarted this lane; rank 0 decides for all
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            continue
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        _worker({"cfg": cfg, "env": config["env"], "lease": lease})
        gc.collect()  # the job's model, engine and optimizer before the next one's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _fit(cfg: JobConfig, storage_path: str | None, worker, config: dict, max_failures: int | None = None, suffix=""):
    """One Ray Train run of ``worker`` with ``config``, shaped (workers, resources, restarts) by ``cfg``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    ray_runtime.train_env()  # Ray Train's controller polls its workers every 0.5 s, not 2 (ddm.distributed.ray_runtime)
    config = {**config, "env": {**ray_runtime.trims_env(), **config["env"]}}  # the trims' switch reaches the workers
    name = run_name(cfg) + (f"-{suffix}" if suffix else "")
    trainer = with_no_retry_policy(ray_runtime.trainer_class())(
        train_loop_per_worker=worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
            | ({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures if max_failures is None else max_failures),
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
    )
    log.info("submitting %s: %d workers%s", name, cfg.ray.num_workers, " with GPUs" if cfg.ray.use_gpu else "")
    try:
        return trainer.fit()
    except Exception as e:
        cause = worker_error(e)
        if cause is None:
            raise
        raise cause from None  # the worker's own error, said as it is (the CLI prints one line), not Ray's wrapper


# --- failures a restart cannot fix end the run at once ---------------------------------------------------


def worker_error(error: BaseException) -> BaseException | None:
    """The first worker error of a failed Ray Train run that no restart can fix (``ddm.store.retries.
    retryable_job_error``: a checksum mismatch, bad input, a lost lease, refused credentials), unwrapped
    from Ray's ``WorkerGroupError``; None when every worker's error may pass on a restart."""

    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, dict):
        return None
    for rank in sorted(failures):
        exc = failures[rank]
        base = getattr(exc, "_base_exc", exc)  # Ray Train wraps a worker's exception with its traceback
        if isinstance(base, BaseException) and not retryable_job_error(base):
            log.debug("rank %s failed with an error a restart cannot fix:\n%s", rank, exc)
            return base
    return None


class NoRetryPolicy:
    """Ray Train's failure policy (``DefaultFailurePolicy``: restarts up to ``max_failures``), except that a
    run whose workers failed with an error no restart can fix (``worker_error``) ends at once: a checksum
    mismatch or a bad config fails the same way on every attempt, and each restart costs a worker group's
    start and a resume. Ray Train has no setting for this (its ``FailureConfig`` counts every worker error
    alike); the controller calls only ``make_decision``. It runs in Ray Train's controller process, which
    imports this module (as it does for ``_worker``)."""

    def __init__(self, failure_config):
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy

        self.failure_config = failure_config
        self._default = DefaultFailurePolicy(failure_config)

    def make_decision(self, training_failed_error):
        from ray.train.v2._internal.execution.failure_handling import FailureDecision

        cause = worker_error(training_failed_error)
        if cause is not None:
            log.warning("not restarting: %s: %s (a restart cannot fix it)", type(cause).__name__, cause)
            return FailureDecision.RAISE
        return self._default.make_decision(training_failed_error)


def with_no_retry_policy(trainer_cls: type) -> type:
    """``trainer_cls`` whose controller gets ``NoRetryPolicy`` instead of Ray Train's default policy (Ray
    Train 2.x's ``_initialize_and_run_controller(failure_policy=...)``; a Ray without it gets the class
    unchanged, and its default restarts)."""
    if not hasattr(trainer_cls, "_initialize_and_run_controller"):
        return trainer_cls

    class Trainer(trainer_cls):
        def _initialize_and_run_controller(self, **kwargs):
            if "failure_policy" in kwargs:
                kwargs["failure_policy"] = NoRetryPolicy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    Trainer.__name__ = Trainer.__qualname__ = trainer_cls.__name__
    return Trainer
