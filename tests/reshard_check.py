"""Test helper, run as one process per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set):
restore a job's newest commit on this world size the way ``train`` does, then compare every
parameter's fp32 weights and Adam moments, as DeepSpeed reports them after the restore (its own
collective ``safe_get_full_*`` API, not ddm's code), with the saved ones rebuilt from the
commit's portable files. Rank 0 prints the largest differences as JSON.

    python -m tests.reshard_check store=... [overrides]
"""

from __future__ import annotations

import glob
import json
import os
import sys

import torch
import torch.distributed as dist


def saved_state(step_dir: str, names: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """{name: {fp32, exp_avg, exp_avg_sq}} and Adam's step, rebuilt from the commit's portable files
    (every rank's pieces, laid end to end by their offsets) with safetensors alone, not ddm's
    reshard code. What these files hold is pinned down by the kill/resume tests: every resume
    restores from them to the uninterrupted run's weights."""
    from safetensors import safe_open

    pieces: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
    shapes, steps = {}, set()
    for path in sorted(glob.glob(os.path.join(step_dir, "portable", "rank*.safetensors"))):
        with safe_open(path, "pt") as f:
            shapes.update(json.loads(f.metadata()["shapes"]))
            steps.add(float(f.metadata()["step"]))
            for key in f.keys():
                name, kind, start = key.rsplit("|", 2)
                pieces.setdefault((name, kind), []).append((int(start), f.get_tensor(key)))
    assert len(steps) == 1, steps
    out = {}
    for name in names:
        out[name] = {
            kind: torch.cat([t for _, t in sorted(pieces[(name, kind)], key=lambda p: p[0])]).reshape(shapes[name])
            for kind in ("fp32", "exp_avg", "exp_avg_sq")
        }
    return out, steps.pop()


def main(overrides: list[str]) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ddm.checkpoint.manager import CheckpointManager
    from ddm.checkpoint.reshard import _optimizer_step, load_portable
    from ddm.core.config import load
    from ddm.data.reader import PartitionReader
    from ddm.distributed.parallel import ParallelState, ensure_process_group
    from ddm.store import Store, layout
    from ddm.train.engine import build_engine
    from ddm.train.job import JobConfig, resolve
    from ddm.train.resume import zero_lr_step
    from ddm.train.trainer import build_job

    cfg = resolve(load(JobConfig, None, overrides))
    ensure_process_group("gloo")
    ps = ParallelState.current()
    cpu, zero = torch.device("cpu"), cfg.engine.zero_stage
    store = Store(cfg.store)
    run = store.child(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    model, objective, _ = build_job(cfg, store, cpu)
    engine = build_engine(model, cfg, False)
    reader = PartitionReader(store, cfg.data_partition, cfg.micro_batch_size, ps.dp_rank, ps.dp_size, cfg.seed)
    gen = torch.Generator().manual_seed(0)

    def reshard(paths: list[str], own_pieces: bool) -> None:  # what train() does (no layout: all pieces)
        zero_lr_step(engine, objective, reader, gen, cfg, cpu)
        load_portable(engine, paths, zero, ps, 0)

    ckpt = CheckpointManager(run, ps.rank, ps.world_size, reshard=reshard)
    step, state = ckpt.load_latest(engine)
    got = {}
    for name, p in engine.module.named_parameters():
        if zero:
            got[name] = {
                "fp32": safe_get_full_fp32_param(p),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
            }
            if zero != 3:  # ZeRO-3 partitions the module's weights: the fp32 masters above are them
                got[name]["module"] = p.detach().clone()
        else:
            st = engine.optimizer.state[p]
            got[name] = {"fp32": p.detach(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
    if ps.rank == 0:
        saved, saved_step = saved_state(
            os.path.join(cfg.store, cfg.run_dir, layout.CHECKPOINTS, layout.step_dir(step)), list(got)
        )
        diffs = {k: 0.0 for k in ("fp32", "exp_avg", "exp_avg_sq", "module")} if saved else None
        for name, values in got.items() if saved else ():
            for key, v in values.items():
                ref = saved[name]["fp32" if key == "module" else key]
                diffs[key] = max(diffs[key], float((v.float() - ref.float()).abs().max()))
        moment_scale = max(float(v["exp_avg"].abs().max()) for v in got.values())
        print(
            json.dumps(
                {
                    "step": step,
                    "resharded_from": state.resharded_from,
                    "adam_step": _optimizer_step(engine),
                    "saved_adam_step": saved_step,
                    "max_diff": diffs,
                    "moment_scale": moment_scale,
                    "params": len(got),
                }
            ),
            flush=True,
        )
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
