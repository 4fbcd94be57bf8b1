"""One expert's (or the router's) training: a plain function for Ray Train workers or no Ray.

``train(cfg)`` reads top to bottom: process group, model, DeepSpeed engine, EMA, data, resume,
loop, checkpoints, export. It works as one process (``python -m ddm.train.expert``), under
``torchrun`` / ``deepspeed`` (which set RANK, WORLD_SIZE, MASTER_ADDR), and inside Ray Train
workers (``ddm.islands``); Ray never reaches into it.

Resume has one source of truth: the newest committed checkpoint in the store. Whether Ray restarted
the workers or the user ran the command again, the function finds it there and continues with the
same model, EMA, optimizer, step, RNG streams and data position, so the loss curve continues as if
nothing had happened.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddm.config import deep_merge, to_dict
from ddm.flow import FlowMatching
from ddm.models import ModelConfig

log = logging.getLogger("ddm.train")


JOBS = ("expert", "router", "distill")

# Fields a re-run may change without changing what is being trained (how long, how often, where).
RESUMABLE_CHANGES = frozenset({"store", "steps", "checkpoint_every", "keep_checkpoints", "export_every", "log_every", "cpus_per_worker", "use_gpu", "max_failures"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one expert job needs; saved as JSON beside its checkpoints and exports."""

    store: str = "runs/digits"  # run root URL (local path, file://, s3://, memory:// for tests)
    job: str = "expert"  # expert: velocity on one partition; router: p(partition | x_t, t, c) on all data;
    # distill: one dense student regressing the ensemble's velocity (teacher = the expert of each sample's partition)
    partition: int = 0  # which partition this expert learns; -1 trains on all data (a monolith)
    teacher: str = ""  # distill jobs: the id of the ensemble distilled (empty: the store's current one)
    model: ModelConfig = field(default_factory=lambda: ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10))
    flow: FlowMatching = field(default_factory=FlowMatching)
    steps: int = 1000
    global_batch_size: int = 64  # = micro_batch_size x grad_accum x data-parallel ranks
    grad_accum: int = 1
    lr: float = 1e-4  # the paper: constant 1e-4, no warm-up
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # the paper's; warmed up so short runs are usable
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed settings, merged last
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    export_every: int = 0  # 0: export the EMA model at the end only
    log_every: int = 50
    seed: int = 0
    # The Ray side (ddm.islands): workers, GPUs, restarts.
    num_workers: int = 1
    cpus_per_worker: int = 1  # Ray gives each worker this many CPUs (and torch as many threads)
    use_gpu: bool = False
    max_failures: int = 3

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "grad_accum", "checkpoint_every", "log_every", "num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.job not in JOBS:
            raise ValueError(f"job must be one of {list(JOBS)}, got {self.job!r}")
        if self.partition < -1:
            raise ValueError(f"partition must be >= 0 (or -1 for all data), got {self.partition}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.global_batch_size % (self.grad_accum * self.num_workers):
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by grad_accum={self.grad_accum} x "
                f"num_workers={self.num_workers}; pick sizes that multiply out"
            )
        moe = self.model.moe
        if moe.enabled and self.num_workers % moe.ep_size:
            raise ValueError(f"model.moe.ep_size={moe.ep_size} must divide num_workers={self.num_workers}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.grad_accum * self.num_workers)

    @property
    def run_dir(self) -> str:
        """Where this job's checkpoints, exports and metrics live, relative to the store root."""
        if self.job == "router":
            return "router"
        if self.job == "distill":  # a student belongs to its teacher: one folder per ensemble
            if not self.teacher:
                raise ValueError("a distill job needs its teacher's ensemble id: call with_teacher(cfg) first")
            return f"distilled/{self.teacher}"
        return "monolith" if self.partition == -1 else f"experts/{self.partition:02d}"

    @property
    def data_partition(self) -> int | None:
        """The partition the job reads (None: all data, for the router and a monolith)."""
        return None if self.job != "expert" or self.partition == -1 else self.partition


def check_inputs(cfg: TrainConfig) -> dict:
    """Validate the job against the store before any worker starts; returns the dataset manifest."""
    from ddm.data.partition import PARTITIONS_DIR
    from ddm.data.shards import Dataset
    from ddm.store import Store

    store = Store(cfg.store)
    store.check_reachable()
    dataset = Dataset(store)
    if tuple(dataset.sample_shape) != cfg.model.data_shape:
        raise ValueError(
            f"model.data_shape {cfg.model.data_shape} does not match the dataset's samples {tuple(dataset.sample_shape)}"
        )
    if cfg.model.num_classes and cfg.model.num_classes != dataset.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has {dataset.num_classes} classes")
    if cfg.job in ("router", "distill") and cfg.model.moe.enabled:
        raise ValueError(f"{cfg.job} models are dense here: set model.moe.num_experts=0 for a {cfg.job} job")
    if cfg.job == "distill":
        _check_teacher(store, cfg)
    if store.exists(f"{cfg.run_dir}/config.json"):  # a re-run resumes: it must train the same thing
        diffs = config_changes(store.read_json(f"{cfg.run_dir}/config.json"), to_dict(cfg))
        if diffs:
            raise ValueError(
                f"{cfg.store}/{cfg.run_dir} was started with other settings ({diffs}); a re-run resumes that job and "
                f"may change only {sorted(RESUMABLE_CHANGES - {'store'})}. Use another store or delete {cfg.run_dir}/ to start over"
            )
    if cfg.job == "router" or cfg.partition >= 0:
        if not store.is_committed(PARTITIONS_DIR):
            raise ValueError(f"{cfg.store} has no committed partitions: run `ddm partition {cfg.store}` first")
        k = store.manifest(PARTITIONS_DIR)["num_partitions"]
        if cfg.job == "expert" and cfg.partition >= k:
            raise ValueError(f"partition {cfg.partition} does not exist: {cfg.store} has partitions 0..{k - 1}")
    return dataset.manifest


def config_changes(old: dict, new: dict) -> str:
    """The fields (as dicts of TrainConfig) a re-run may not change that differ, as "k: old -> new"."""
    changed = sorted(k for k in new if k not in RESUMABLE_CHANGES and old.get(k) != new[k])
    return "; ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)


def is_finished(cfg: TrainConfig) -> bool:
    """Whether the job's export exists at its final step (nothing left to train)."""
    from ddm.store import Store

    run = Store(cfg.store).child(cfg.run_dir)
    return run.is_committed("export") and run.manifest("export").get("step") == cfg.steps


def _teacher_description(store, cfg: TrainConfig) -> dict:
    from ddm.ensemble import ENSEMBLE_FILE

    if not store.exists(ENSEMBLE_FILE):
        raise ValueError(f"distillation needs the ensemble as teacher: run `ddm assemble {cfg.store}` first")
    return store.read_json(ENSEMBLE_FILE)


def with_teacher(cfg: TrainConfig) -> TrainConfig:
    """A distill job bound to the store's current ensemble (other jobs are returned unchanged)."""
    import dataclasses

    from ddm.ensemble import ensemble_id
    from ddm.store import Store

    if cfg.job != "distill" or cfg.teacher:
        return cfg
    return dataclasses.replace(cfg, teacher=ensemble_id(_teacher_description(Store(cfg.store), cfg)))


def _check_teacher(store, cfg: TrainConfig) -> None:
    """Distillation reads the assembled ensemble; the student must model the same data."""
    from ddm.ensemble import ensemble_id

    desc = _teacher_description(store, cfg)
    if cfg.teacher != ensemble_id(desc):
        raise ValueError(
            f"teacher={cfg.teacher!r} is not the store's ensemble ({ensemble_id(desc)}, assembled from other exports); "
            "leave teacher empty to distil the current one"
        )
    if tuple(desc["data_shape"]) != cfg.model.data_shape or int(desc["num_classes"]) != cfg.model.num_classes:
        raise ValueError(
            f"the student (data_shape {cfg.model.data_shape}, {cfg.model.num_classes} classes) does not match the ensemble "
            f"(data_shape {tuple(desc['data_shape'])}, {desc['num_classes']} classes)"
        )
    if desc["flow"]["path"] != cfg.flow.path:
        raise ValueError(f"the ensemble's experts follow the {desc['flow']['path']!r} path; set flow.path={desc['flow']['path']}")


def deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    ds = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,  # ddm logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, cfg.deepspeed)


def train(cfg: TrainConfig, report: Callable[[dict], None] | None = None) -> dict:
    """Train (or resume) one expert; returns a summary. ``report`` receives metrics (Ray Train)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ddm.checkpoint import CheckpointManager, RankState, _fault_hook
    from ddm.data.reader import PartitionReader
    from ddm.data.partition import PARTITIONS_DIR
    from ddm.models import build_model, build_router
    from ddm.parallel import ParallelState, ensure_process_group
    from ddm.store import Store
    from ddm.train.ema import EMA

    # --- setup --------------------------------------------------------------------------------
    owns_group = ensure_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ps = ParallelState.current(cfg.model.moe.ep_size if cfg.model.moe.enabled else 1)
    if ps.world_size != cfg.num_workers:
        raise ValueError(f"num_workers={cfg.num_workers} but the job has {ps.world_size} ranks")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", ps.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    store = Store(cfg.store)
    run = store.child(cfg.run_dir)
    t_start, started_at = time.perf_counter(), time.time()

    # --- model, optimizer, engine -------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.job == "router":
        num_partitions = int(store.manifest(PARTITIONS_DIR)["num_partitions"])
        model = build_router(cfg.model, num_partitions)
    else:
        model = build_model(cfg.model)
    teacher = None
    if cfg.job == "distill":
        from ddm.ensemble import load_ensemble

        teacher = load_ensemble(store, rule="oracle", device=device)  # the expert of each sample's partition
        if getattr(model, "y_embedder", None) is not None:
            model.y_embedder.dropout_prob = 0.0  # labels are dropped once, below, so teacher and student see the same
    params = {"params": [p for p in model.parameters()], "name": "params", "weight_decay": cfg.weight_decay}
    groups = split_params_into_different_moe_groups_for_optimizer(params) if cfg.model.moe.enabled else [params]
    # A torch optimizer, not a DeepSpeed "optimizer" config: that one compiles fused Adam on CPU.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, on_gpu))
    with _whole_params(engine, cfg.zero_stage):
        ema = EMA(engine.module, cfg.ema_decay)
    t_engine = time.perf_counter()

    # --- data ---------------------------------------------------------------------------------
    reader = PartitionReader(store, cfg.data_partition, cfg.micro_batch_size, ps.dp_rank, ps.dp_size, cfg.seed)
    # Noise and times: one stream per rank, saved and restored with the checkpoint.
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + ps.rank)
    t_data = time.perf_counter()

    # --- resume -------------------------------------------------------------------------------
    ckpt = CheckpointManager(run, ps.rank, ps.world_size, cfg.keep_checkpoints)
    step, metrics = 0, []
    restored = ckpt.load_latest(engine)
    if restored is not None:
        step, state = restored
        ema.load_state_dict({"shadow": {k[4:]: v for k, v in state.tensors.items() if k.startswith("ema.")}, "num_updates": state.info["ema_updates"]})
        reader.load_state_dict(state.info["reader"])
        gen.set_state(state.tensors["rng.noise"])
        torch.set_rng_state(state.tensors["rng.torch"])  # label dropout draws from the global stream
        metrics = [m for m in _read_metrics(run) if m["step"] <= step]
        log.info("rank %d resumed from %s/checkpoints/step_%07d", ps.rank, run.url, step)
    elif ps.is_main:
        run.write_json("config.json", to_dict(cfg))
    t_restore = time.perf_counter()
    startup = {
        "engine_s": t_engine - t_start,
        "data_s": t_data - t_engine,
        "restore_s": t_restore - t_data,
        "resumed_from": step if restored else None,
        "started_at": started_at,  # wall clock: lets a launcher measure its own start-up share
    }
    if ps.is_main:
        log.info("expert %s: %s, world %d, micro-batch %d, startup %s", cfg.run_dir, cfg.model.arch, ps.world_size, cfg.micro_batch_size, startup)

    # --- loop ---------------------------------------------------------------------------------
    flow = cfg.flow
    engine.train()
    t_loop = time.perf_counter()
    window_loss, window_n, last_log = 0.0, 0, time.perf_counter()
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            batch = reader.next_batch()
            x = batch["x"].to(device)
            y = batch["y"].to(device) if cfg.model.num_classes else None
            if cfg.job == "router":  # cross-entropy on noised samples of all data -> their partition
                x_t, t = flow.noised(x, gen)
                loss = torch.nn.functional.cross_entropy(engine(x_t, t, y).float(), batch["partition"].to(device))
            elif cfg.job == "distill":  # |v - v_teacher|^2, teacher = the expert of the sample's partition
                x_t, t = flow.noised(x, gen)
                if y is not None and cfg.model.class_dropout_prob > 0:
                    drop = torch.rand(y.shape[0], device=device) < cfg.model.class_dropout_prob
                    y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)  # the null label
                with torch.no_grad():
                    v_teacher = teacher.velocity(x_t, t, y, partition=batch["partition"].to(device))
                loss = (engine(x_t, t, y).float() - v_teacher.float()).pow(2).mean()
            else:
                losses = flow.training_losses(engine, x, y, generator=gen)
                loss = losses["loss"].mean()
                if "moe_aux" in losses:
                    loss = loss + cfg.model.moe.aux_loss_coef * losses["moe_aux"]
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        step += 1
        if "first_step_s" not in startup:  # from train() entry to the end of the first step
            startup["first_step_s"] = time.perf_counter() - t_start
        if os.environ.get("DDM_FAULT", "").startswith("step:"):
            ckpt.wait()  # fault tests crash at a step only after the previous checkpoint is uploaded
        _fault_hook("step", step, ps.rank)
        with _whole_params(engine, cfg.zero_stage):
            ema.update(engine.module)
        window_loss += loss.item()
        window_n += 1

        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            record = {"step": step, "loss": window_loss / window_n, "steps_per_s": window_n / (now - last_log), "time": time.time()}
            metrics.append(record)
            window_loss, window_n, last_log = 0.0, 0, now
            if ps.is_main:
                log.info("%s step %d loss %.4f (%.2f steps/s)", cfg.run_dir, step, record["loss"], record["steps_per_s"])
                run.write_json("progress.json", {**record, "steps": cfg.steps})  # cheap, for progress bars and status
            if report is not None:
                report(record)

        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = RankState(
                tensors={
                    **{f"ema.{k}": v for k, v in ema.shadow.items()},
                    "rng.noise": gen.get_state(),
                    "rng.torch": torch.get_rng_state(),
                },
                info={"step": step, "reader": reader.state_dict(), "ema_updates": ema.num_updates},
            )
            ckpt.save(engine, step, state)
            if ps.is_main:
                run.write_bytes("metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics).encode())
        if cfg.export_every and step % cfg.export_every == 0 and step != cfg.steps:
            export(ema.weights(engine.module), cfg, run, ps, step)

    ckpt.close()  # the last upload must be committed before the job reports success
    export(ema.weights(engine.module), cfg, run, ps, step)
    summary = {
        "step": step,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "startup": startup,
        "loop_s": time.perf_counter() - t_loop,
        "world_size": ps.world_size,
        **_replica_check(engine.module, cfg.zero_stage),
    }
    if ps.is_main:
        run.write_json("summary.json", summary)
    if owns_group:
        dist.barrier()
        dist.destroy_process_group()  # torch + gloo can abort at exit without it
    return summary


def _whole_params(engine, zero_stage: int):
    """A context in which every parameter is whole: ZeRO-3 shards them across ranks, so gather."""
    import contextlib

    import deepspeed

    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
    return contextlib.nullcontext()


def _replica_check(module: torch.nn.Module, zero_stage: int) -> dict:
    """Largest difference of dense weights across ranks (0 for data parallelism done right), and
    whether MoE expert weights differ across ranks (they should under expert parallelism)."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param

    if dist.get_world_size() == 1 or zero_stage == 3:
        return {"dense_max_diff_across_ranks": 0.0, "expert_weights_differ_across_ranks": None}
    dense = torch.cat([p.detach().float().flatten().cpu() for p in module.parameters() if not is_moe_param(p)])
    expert = [p.detach().float().flatten().cpu() for p in module.parameters() if is_moe_param(p)]
    ref = dense.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([(dense - ref).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    out = {"dense_max_diff_across_ranks": float(diff), "expert_weights_differ_across_ranks": None}
    if expert:
        mine = torch.cat(expert)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        differs = torch.tensor([float(not torch.equal(mine, ref))])
        dist.all_reduce(differs, op=dist.ReduceOp.MAX)
        out["expert_weights_differ_across_ranks"] = bool(differs.item())
    return out


def _read_metrics(run) -> list[dict]:
    if not run.exists("metrics.jsonl"):
        return []
    return [json.loads(line) for line in run.read_bytes("metrics.jsonl").decode().splitlines() if line.strip()]


def export(weights: dict[str, torch.Tensor], cfg: TrainConfig, run, ps, step: int) -> None:
    """The EMA model as safetensors + config.json under ``export/``, committed by a manifest.

    With expert parallelism each rank holds some MoE experts; their weights are gathered to rank 0
    under global expert indices, so the export is one complete model.
    """
    import torch.distributed as dist
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    ep = cfg.model.moe.ep_size if cfg.model.moe.enabled else 1
    if ep > 1:
        local_experts = cfg.model.moe.num_experts // ep
        mine = {}
        for name, tensor in state.items():
            marker = ".deepspeed_experts."
            if marker in name:
                head, tail = name.split(marker)
                idx, rest = tail.split(".", 1)
                mine[f"{head}{marker}{ps.ep_rank * local_experts + int(idx)}.{rest}"] = tensor
        gathered: list = [None] * ps.world_size
        dist.all_gather_object(gathered, mine)
        state = {k: v for k, v in state.items() if ".deepspeed_experts." not in k}
        for part in gathered[: ep]:  # ranks 0..ep-1 hold every expert once
            state.update(part)
    if not ps.is_main:
        return
    config = {
        "job": cfg.job,
        "model": to_dict(cfg.model),
        "flow": to_dict(cfg.flow),
        "step": step,
        "partition": cfg.data_partition,
        "ema_decay": cfg.ema_decay,
    }
    if cfg.job == "distill":
        config["teacher"] = cfg.teacher
    if cfg.job == "router":
        config["num_partitions"] = int(weights["head.bias"].shape[0])
    known = {
        "model.safetensors": run.write_hashed("export/model.safetensors", save(state, metadata={"step": str(step)})),
        "config.json": run.write_hashed("export/config.json", json.dumps(config, indent=2).encode()),
    }
    run.commit("export", list(known), meta={"step": step}, known=known)
    log.info("exported the EMA model of %s at step %d", cfg.run_dir, step)


def main(argv: list[str] | None = None) -> None:
    """``python -m ddm.train.expert [-c spec.yaml] key=value ...``: one process, or under torchrun."""
    import argparse

    from ddm.config import load

    parser = argparse.ArgumentParser(description="train one expert without Ray (torchrun/deepspeed set the ranks)")
    parser.add_argument("-c", "--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = with_teacher(load(TrainConfig, args.config, args.overrides))
    check_inputs(cfg)
    print(json.dumps(train(cfg)))


if __name__ == "__main__":
    main()
