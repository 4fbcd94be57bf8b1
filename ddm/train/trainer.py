"""The training loop of every job kind: a plain function for Ray Train workers, torchrun or one process.

``train(cfg)`` reads top to bottom: process group, model, DeepSpeed engine, EMA, objective, data,
resume, loop, checkpoints, export. The job kind (expert, monolith, router, distill) only chooses
the model and the objective (``ddm.train.objectives``); the loop is the same for all. It runs as
one process (``python -m ddm.train``), under ``torchrun`` / ``deepspeed`` (which set RANK,
WORLD_SIZE, MASTER_ADDR), and inside Ray Train workers (``ddm.launchers.ray_job``); Ray never
reaches into it.

Resume has one source of truth: the newest committed checkpoint in the store. Whether Ray restarted
the workers or the user ran the command again, the function finds it there and continues with the
same model, EMA, optimizer, step, RNG streams and data position, so the loss curve continues as if
nothing had happened.

One writer per job: the launcher holds the job folder's lease (``job_lease``; ``ddm.store.lease``) and
hands its token to every rank, whose store writes are then fenced by it; a rank whose job lost the
lease stops before its next write.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ddm.checkpoint.manager import CheckpointManager, RankState, _fault_hook
from ddm.checkpoint.reshard import load_own_portable, load_portable, save_portable
from ddm.core.config import to_dict
from ddm.data.reader import PartitionReader
from ddm.data.shards import partitions_manifest
from ddm.distributed.parallel import (
    ParallelState,
    check_one_rank_per_device,
    ensure_process_group,
    rank_device,
    use_accelerator,
)
from ddm.ensemble.assemble import load_ensemble
from ddm.models.build import build_model, build_router
from ddm.models.flow import FlowMatching
from ddm.models.pretrained import init_from
from ddm.models.text_encoder import TextEncoder
from ddm.store import Store, layout
from ddm.store.lease import Token, fenced, holding
from ddm.train.board import open_board
from ddm.train.checks import check_encoders, from_rank0, stop_if_diverged
from ddm.train.ema import EMA
from ddm.train.engine import build_engine, replica_check, uses_bf16, uses_compile
from ddm.train.export import write_export
from ddm.train.job import JobConfig
from ddm.train.objectives import DistillLoss, RouterLoss, VelocityLoss
from ddm.train.prefetch import Prefetcher
from ddm.train.resume import restore_rng, rng_state, zero_lr_step
from ddm.train.uploads import Uploads

log = logging.getLogger("ddm.train")


def build_job(cfg: JobConfig, store: Store, device: torch.device) -> tuple[torch.nn.Module, Callable, dict]:
    """The model, the objective and the export's extra fields of the job's kind."""
    flow = FlowMatching.of(cfg.flow)
    if cfg.job == "router":
        num_partitions = int(partitions_manifest(store)["num_partitions"])
        return build_router(cfg.model, num_partitions), RouterLoss(flow), {"num_partitions": num_partitions}
    model = build_model(cfg.model)
    if cfg.job == "distill":
        teacher = load_ensemble(store, rule="oracle", device=device)  # the expert of each sample's partition
        # The objective drops labels or captions, once for teacher and student: the student's own dropout is off.
        text = cfg.model.text.enabled
        if text:
            model.caption_dropout_prob = 0.0
        elif getattr(model, "y_embedder", None) is not None:
            model.y_embedder.dropout_prob = 0.0
        distill = DistillLoss(
            flow,
            lambda x, t, y, partition: teacher.velocity(x, t, y, partition=partition),
            cfg.model.num_classes,
            cfg.model.text.caption_dropout_prob if text else cfg.model.class_dropout_prob,
        )
        return model, distill, {"teacher": cfg.teacher}
    return model, VelocityLoss(flow, cfg.model.moe.aux_loss_coef), {}


@contextmanager
def job_lease(cfg: JobConfig, force: bool = False, wait_s: float = 0.0) -> Iterator[Token]:
    """Hold the lease on the job's folder for the block (in the launching process); yields the
    token to pass to ``train`` in every rank."""
    with holding(Store(cfg.store), cfg.run_dir, f"ddm train {cfg.run_dir}", force, wait_s) as (_, token):
        yield token


def threads_for(cfg: JobConfig) -> int:
    """The job's torch threads per process: ``cfg.threads``, else what it is given (``JobConfig.threads``).
    Under Ray Train (``DDM_RAY_CPUS``, set by the launcher) never more than the CPUs Ray reserved."""
    ray_cpus = int(os.environ.get("DDM_RAY_CPUS", 0))
    if ray_cpus:
        if cfg.threads > ray_cpus:
            raise ValueError(
                f"threads={cfg.threads} but Ray reserved ray.cpus_per_worker={ray_cpus} CPUs per worker: "
                f"raise ray.cpus_per_worker or lower threads"
            )
        return cfg.threads or ray_cpus
    if cfg.threads:
        return cfg.threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def train(
    cfg: JobConfig,
    report: Callable[[dict], None] | None = None,
    device: torch.device | None = None,
    lease: Token | None = None,
    lease_from_rank0: bool = False,
) -> dict:
    """Train (or resume) one job; returns a summary. ``report`` receives, at each checkpoint and at
    the end, the last logged record and the newest commit's URL (Ray Train).

    ``device``: the launcher's choice (Ray Train assigns each worker its GPU); by default the GPU of
    this process's local rank when CUDA is there, else the CPU. ``lease``: the token of the job
    folder's lease (``job_lease``); every write is fenced by it. Without one, nothing is fenced.
    ``lease_from_rank0``: every rank takes rank 0's token (under torchrun only rank 0 holds the lease).
    """
    # --- setup --------------------------------------------------------------------------------
    torch.set_num_threads(threads_for(cfg))
    if device is None:  # chosen before LOCAL_RANK is defaulted, and told to DeepSpeed (rank_device)
        device = rank_device(torch.cuda.is_available())
    use_accelerator(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)  # before any collective: NCCL runs on the current device
    owns_group = ensure_process_group("nccl" if on_gpu else "gloo")
    check_one_rank_per_device(device)
    ps = ParallelState.current(cfg.model.moe.ep_size if cfg.model.moe.enabled else 1)
    if ps.world_size != cfg.ray.num_workers:
        raise ValueError(f"ray.num_workers={cfg.ray.num_workers} but the job has {ps.world_size} ranks")
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    # One id for this attempt and one lease for every rank: checkpoint markers are bound to both.
    lease, attempt = from_rank0(lease, lease_from_rank0)
    store = Store(cfg.store)
    if lease is not None:
        store = fenced(store, lease)
        store.fence("the start of the job", always=True)  # a restart after the lease was lost ends here
    run = store.child(cfg.run_dir)
    t_start, started_at = time.perf_counter(), time.time()

    # --- model, objective, engine, EMA ------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model, objective, export_extra = build_job(cfg, store, device)
    text_encoder = None
    if cfg.model.text.embeddings == "store":  # computed at ingest: read with the images
        text_encoder = "store"
        export_extra["text_encoder"] = store.manifest(layout.DATA_DIR)["text_embeddings"]["encoder"]
    elif cfg.model.text.enabled:  # frozen, on this rank's device; its embeddings are the captions' y
        text_encoder = TextEncoder.load(cfg.model.text.encoder, cfg.model.text.length, device, cfg.store)
        if text_encoder.hidden_size != cfg.model.text.dim:
            raise ValueError(f"model.text.dim={cfg.model.text.dim} but the encoder is {text_encoder.hidden_size} wide")
        export_extra["text_encoder"] = text_encoder.describe()
    if cfg.init_from:  # pretrained weights, checked against the model before anything is trained
        local = cfg.model.moe.num_experts // ps.ep_size  # expert parallelism: this rank's MoE experts
        experts = (ps.ep_rank * local, local) if cfg.model.moe.enabled and ps.ep_size > 1 else None
        export_extra["init_from"] = init_from(model, cfg.init_from, store, experts)
    check_encoders(cfg, store, text_encoder, export_extra)  # the one its init_from or teacher recorded
    engine = build_engine(model, cfg, on_gpu)
    ema = EMA(engine.module, cfg.ema_decay)  # under ZeRO-3: this rank's shards (ddm.train.ema)
    t_engine = time.perf_counter()

    # --- data ---------------------------------------------------------------------------------
    reader = PartitionReader(
        store, cfg.data_partition, cfg.micro_batch_size, ps.dp_rank, ps.dp_size, cfg.seed, pin_memory=on_gpu,
        embeddings=text_encoder == "store",  # only a job that reads them decodes the stored caption embeddings
    )  # fmt: skip
    # Noise and times: one stream per rank, made on the job's device, saved and restored with the checkpoint.
    noise_seed = cfg.seed * 100_003 + ps.rank
    gen = torch.Generator(device=device).manual_seed(noise_seed)
    t_data = time.perf_counter()

    # --- resume -------------------------------------------------------------------------------
    # A router's optimizer state from ddm 0.1 follows another parameter order: never restore it.
    min_format = 2 if cfg.job == "router" else 1
    num_experts = cfg.model.moe.num_experts if cfg.model.moe.enabled else 0
    zero = cfg.engine.zero_stage

    def reshard(
        paths: list[str], own_pieces: bool
    ) -> None:  # every resume: from the portable state (ddm.checkpoint.reshard)
        zero_lr_step(engine, objective, reader, gen, cfg, device, text_encoder)
        if own_pieces:  # the same workers and split: this rank's pieces alone
            load_own_portable(engine, paths[0], zero, ps, num_experts)
        else:
            load_portable(engine, paths, zero, ps, num_experts, ema=ema)

    ckpt = CheckpointManager(
        run,
        ps.rank,
        ps.world_size,
        cfg.checkpoint.keep,
        min_format=min_format,
        portable=lambda path: save_portable(engine, path, zero, ps, num_experts, ema=ema),
        reshard=reshard,
        ep_size=ps.ep_size,
        attempt=attempt,
        layout=f"zero{zero}-ep{ps.ep_size}" if zero in (1, 2) else None,  # ZeRO 1/2: own pieces suffice
    )
    step, metrics = 0, []
    restored = ckpt.load_latest(engine)
    if restored is not None:
        step, state = restored
        shadow = {k[4:]: v for k, v in state.tensors.items() if k.startswith("ema.")}
        upgrade = getattr(engine.module, "upgrade_state_dict", None)  # names of older checkpoints
        if ema.from_portable:  # a ZeRO-3 reshard: the shards came whole with the portable state
            ema.num_updates = int(state.info["ema_updates"])
        else:
            ema.load_state_dict(
                {"shadow": upgrade(shadow) if upgrade else shadow, "num_updates": state.info["ema_updates"]}
            )
        if state.resharded_from is None:
            reader.load_state_dict(state.info["reader"])
            restore_rng(gen, state, device, noise_seed + step)
        else:  # the same epoch, at the same share of it; new noise streams (one per rank now)
            reader.load_state_dict(state.info["reader"], reshard=True)
            gen.manual_seed(noise_seed + step)
            torch.manual_seed(cfg.seed * 100_003 + ps.rank + step)
        metrics = [m for m in _read_metrics(run) if m["step"] <= step]
        log.info("rank %d resumed from %s/%s/%s", ps.rank, run.url, layout.CHECKPOINTS, layout.step_dir(step))
    elif ps.is_main:
        run.write_json(layout.JOB_CONFIG, to_dict(cfg))
    t_restore = time.perf_counter()
    startup = {
        "engine_s": t_engine - t_start,
        "data_s": t_data - t_engine,
        "restore_s": t_restore - t_data,
        "resumed_from": step if restored else None,
        "started_at": started_at,  # wall clock: lets a launcher measure its own start-up share
    }
    if ps.is_main:
        log.info(
            "%s %s: %s, world %d, micro-batch %d, startup %s",
            cfg.kind,
            cfg.run_dir,
            cfg.model.arch,
            ps.world_size,
            cfg.micro_batch_size,
            startup,
        )

    # From here on batches come read ahead (the resume above may have drawn one for its lr-0 step).
    batches = Prefetcher(reader, device, cfg.model.num_classes, text_encoder=text_encoder)
    board = open_board(run, step if restored else None) if ps.is_main else None
    uploads = Uploads() if ps.is_main else None  # progress and TensorBoard, off the step's path

    # --- loop ---------------------------------------------------------------------------------
    engine.train()
    t_loop = time.perf_counter()
    # Losses add up on the device (float64, as exact as Python floats); read once per log window,
    # since reading a GPU value every step would make the host wait for the device.
    window_loss, window_n, last_log = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter()
    # The first step whose loss was not finite (0: none), kept on the device: checked, on every
    # rank together, at each log window and before anything is committed or exported.
    first_bad = torch.zeros((), dtype=torch.int64, device=device)

    def check_finite(weights: bool) -> None:
        tensors = [*ema.shadow.values(), *(p.detach() for p in engine.module.parameters())] if weights else []
        stop_if_diverged(first_bad, tensors, step, cfg, ckpt)

    stall_s, saves = 0.0, 0  # how long training waited for checkpoint snapshots, over how many
    snapshots = set(cfg.checkpoint.snapshot_steps(cfg.steps))
    try:
        while step < cfg.steps:
            for _ in range(cfg.grad_accum):
                loss = objective(engine, batches.next(), gen)
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            step += 1
            if "first_step_s" not in startup:  # from train() entry to the end of the first step
                startup["first_step_s"] = time.perf_counter() - t_start
            if os.environ.get("DDM_FAULT", "").startswith("step:"):
                ckpt.wait()  # fault tests crash at a step only after the previous checkpoint is uploaded
            _fault_hook("step", step, ps.rank)
            ema.update(engine.module)  # no collective: under ZeRO-3 each rank averages its own shards
            window_loss += loss.detach().double()
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step, first_bad)
            window_n += 1

            if step % cfg.log_every == 0 or step == cfg.steps:
                check_finite(weights=False)
                mean_loss = window_loss.item() / window_n  # the one host sync of the window
                now = time.perf_counter()
                record = {
                    "step": step,
                    "loss": mean_loss,
                    "steps_per_s": window_n / (now - last_log),
                    "time": time.time(),
                }
                metrics.append(record)
                window_loss.zero_()
                window_n, last_log = 0, now
                if ps.is_main:
                    log.info(
                        "%s step %d loss %.4f (%.2f steps/s)", cfg.run_dir, step, record["loss"], record["steps_per_s"]
                    )
                    progress = {**record, "steps": cfg.steps}  # for progress bars and status
                    uploads.submit(layout.PROGRESS, lambda p=progress: run.write_json(layout.PROGRESS, p))
                    if board is not None:
                        board.log(record)
                        uploads.submit("the TensorBoard events", board.upload)

            writes = step % cfg.checkpoint.every == 0 or step == cfg.steps or step in snapshots
            if writes or (cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0):
                check_finite(weights=True)  # nothing non-finite is committed or exported
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                state = RankState(
                    tensors={**{f"ema.{k}": v for k, v in ema.shadow.items()}, **rng_state(gen, device)},
                    info={"step": step, "reader": batches.state_dict(), "ema_updates": ema.num_updates},
                )
                stall_s += ckpt.save(engine, step, state)
                saves += 1
                if ps.is_main:
                    uploads.flush()  # the views are as new as the checkpoint
                    run.write_bytes(
                        layout.METRICS, "".join(json.dumps(m, allow_nan=False) + "\n" for m in metrics).encode()
                    )
                # To Ray at checkpoints only, on every rank (Ray Train's report is a collective that
                # costs about 2 s in Ray 2.60); live progress is in progress.json and TensorBoard.
                if report is not None and metrics:
                    last = ckpt.last_committed
                    report({**metrics[-1], "checkpoint": f"{ckpt.store.url}/{layout.step_dir(last)}" if last else None})
            if cfg.checkpoint.export_every and step % cfg.checkpoint.export_every == 0 and step != cfg.steps:
                write_export(run, ema.weights(engine.module), cfg, ps, step, export_extra)
            if step in snapshots:  # a learning-curve point: the EMA model at this step, kept for good
                snapshot = run.child(f"{layout.SNAPSHOTS}/{layout.step_dir(step)}")
                write_export(snapshot, ema.weights(engine.module), cfg, ps, step, export_extra)

    except BaseException:  # no thread outlives a failed job: no read-ahead, no upload after the lease
        batches.close()
        if uploads is not None:
            uploads.cancel()
        raise
    batches.close()
    ckpt.close()  # the last upload must be committed before the job reports success
    if uploads is not None:
        uploads.close()
    if board is not None:
        board.close()
    if report is not None and metrics:  # the final commit, with the last window's figures
        report({**metrics[-1], "checkpoint": f"{ckpt.store.url}/{layout.step_dir(step)}" if ps.is_main else None})
    write_export(run, ema.weights(engine.module), cfg, ps, step, export_extra)
    summary = {
        "step": step,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "startup": startup,
        "loop_s": time.perf_counter() - t_loop,
        "data_wait_s": batches.wait_s,  # how long the steps waited for the reader (prefetched)
        "checkpoint_stall_s": stall_s,
        "checkpoints_saved": saves,  # by this run (a resumed run counts its own)
        "device": str(device),
        "bf16": uses_bf16(cfg, on_gpu),
        "compiled": uses_compile(cfg, on_gpu),
        "world_size": ps.world_size,
        "threads": torch.get_num_threads(),
        "ema_elements": ema.elements(),  # rank 0's: the whole model, or its ZeRO-3 shards
        **({"init_from": export_extra["init_from"]} if "init_from" in export_extra else {}),
        **replica_check(engine.module, cfg.engine.zero_stage),
        "ended_at": time.time(),  # wall clock, as started_at: a launcher's share after the last step
    }
    if ps.is_main:
        run.write_json(layout.SUMMARY, summary)
    if owns_group:
        dist.barrier()
        dist.destroy_process_group()  # torch + gloo can abort at exit without it
    return summary


def _read_metrics(run: Store) -> list[dict]:
    if not run.exists(layout.METRICS):
        return []
    return [json.loads(line) for line in run.read_bytes(layout.METRICS).decode().splitlines() if line.strip()]
