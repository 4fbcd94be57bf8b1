"""The training stack's overheads, measured side by side in one run (CPU, one worker).

1. steps/s of the whole stack (Ray Train + DeepSpeed + store reader + EMA, 1 worker with both CPUs,
   ZeRO stage 0: with one worker there is nothing to shard) against a bare
   PyTorch loop of the same model, batch, loss and optimizer on in-memory tensors; target >= 0.90.
2. steps/s with background checkpointing every few steps (5 and 20 by default) against no
   checkpoints (same stack, without Ray, to isolate the checkpoint cost); target >= 0.95.
3. time from job start to the first step, broken down: Ray start, worker-group start, DeepSpeed
   init, data, restore;
4. the share of the training loop the steps waited for data (batches read ahead; target < 1%).

    .venv/bin/python bench/train_stack.py [--steps 120] [--arch DiT-S/4] [--batch 32]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BARE = r"""
import json, sys, time, torch
from ddm.models.flow import FlowMatching
from ddm.models import ModelConfig
from ddm.models.build import build_model
arch, batch, steps, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
cfg = ModelConfig(arch, (1, 16, 16), num_classes=10)
model = build_model(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
flow = FlowMatching()
x, y = torch.randn(batch, 1, 16, 16), torch.randint(0, 10, (batch,))
for i in range(steps):
    if i == warm:
        t0 = time.perf_counter()
    loss = flow.training_losses(model, x, y)["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(json.dumps({"steps_per_s": (steps - warm) / (time.perf_counter() - t0)}))
"""


def run(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stack_rate(run_dir: str, warm: int) -> float:
    """Mean steps/s of the logged windows after warm-up, from the job's own metrics."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return statistics.mean(r["steps_per_s"] for r in rows if r["step"] > warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="DiT-S/4")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, nargs="+", default=[5, 20])
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)
    import ray

    from ddm.core.config import load
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.data.partition import PartitionConfig, partition
    from ddm.launchers.ray_job import run_job
    from ddm.store import Store
    from ddm.train.job import JobConfig, check_inputs, resolve

    tmp = tempfile.mkdtemp(prefix="ddm-bench-")
    base = os.path.join(tmp, "store")
    store = Store(base)
    ingest(IngestConfig(source="synthetic:4096", resolution=16, shard_size=2048), store)
    partition(PartitionConfig(num_partitions=1, num_fine=64), store)
    common = [f"model.arch={args.arch}", "model.data_shape=[1,16,16]", "model.num_classes=10", "partition=0"]
    common += [f"global_batch_size={args.batch}", f"steps={args.steps}", "log_every=10", "engine.zero_stage=0"]
    common += ["ray.cpus_per_worker=2"]

    figures: dict = {"arch": args.arch, "batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup}
    # 1. bare loop vs the whole stack under Ray, back to back.
    figures["bare_steps_per_s"] = run(
        [sys.executable, "-c", BARE, args.arch, str(args.batch), str(args.steps), str(args.warmup)]
    )["steps_per_s"]
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    import shutil

    ray_store = os.path.join(tmp, "ray")
    shutil.copytree(base, ray_store)
    fit_at = time.time()
    cfg = resolve(load(JobConfig, None, [f"store={ray_store}", *common, f"checkpoint.every={10**6}"]))
    check_inputs(cfg)
    s = run_job(cfg)
    ray.shutdown()
    figures["stack_steps_per_s"] = stack_rate(os.path.join(ray_store, "experts/00"), args.warmup)
    figures["stack_over_bare"] = figures["stack_steps_per_s"] / figures["bare_steps_per_s"]
    # The steps' wait for data: batches are read ahead (ddm.train.prefetch); target under 1%.
    figures["data_wait_share_of_loop"] = s["data_wait_s"] / s["loop_s"]
    st = s["startup"]
    figures["startup_s"] = {
        "ray_init": t_ray,
        "worker_group_start": st["started_at"] - fit_at,
        "deepspeed_init": st["engine_s"],
        "data": st["data_s"],
        "restore": st["restore_s"],
        "first_step": st.get("first_step_s"),
    }
    # 2. background checkpoints every 5 steps vs none (no Ray: isolates the checkpoint cost).
    rates = {}
    for name, every in (("no_checkpoints", 10**6), *((f"checkpoint_every_{n}", n) for n in args.checkpoint_every)):
        d = os.path.join(tmp, name)
        shutil.copytree(base, d)
        run([sys.executable, "-m", "ddm.train", f"store={d}", *common, f"checkpoint.every={every}"])
        rates[name] = stack_rate(os.path.join(d, "experts/00"), args.warmup)
    for name, rate in rates.items():
        figures[f"steps_per_s_{name}"] = rate
    for n in args.checkpoint_every:
        figures[f"checkpoint_every_{n}_over_none"] = rates[f"checkpoint_every_{n}"] / rates["no_checkpoints"]
    figures["checkpointing_over_none"] = figures[f"checkpoint_every_{args.checkpoint_every[0]}_over_none"]
    figures["targets"] = {"stack_over_bare": 0.90, "checkpointing_over_none": 0.95, "data_wait_share_of_loop": 0.01}
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"bare {figures['bare_steps_per_s']:.2f} steps/s, stack {figures['stack_steps_per_s']:.2f} steps/s "
        f"(ratio {figures['stack_over_bare']:.3f}); with checkpoints: "
        + ", ".join(f"every {n} steps {figures[f'checkpoint_every_{n}_over_none']:.3f}" for n in args.checkpoint_every)
    )
    print(
        f"start-up: {json.dumps({k: round(v, 2) if v is not None else None for k, v in figures['startup_s'].items()})}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
