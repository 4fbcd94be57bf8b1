"""Start-up of a training job: from the command's launch to its first step, broken down, on a
cold machine (DeepSpeed's ops not built yet: an empty torch-extensions cache) and a warm one
(what ``scripts/setup.sh`` and the images leave: the op prebuilt), measured side by side.

A job of the digits main job's kind (DiT-Tiny/2 on 8x8 digits, a local store) runs as
``ddm train expert`` on a local Ray runtime with 2 workers (Ray Train + DeepSpeed ZeRO-2 over
gloo) and as ``python -m ddm.train`` (one process, no Ray), 2 steps each. Figures (seconds):

- to_ray_fit: launch -> the Ray Train run is started (Python imports, config and input checks,
  the local Ray runtime, the job's lease);
- ray_workers: -> the workers enter ``train()`` (Ray Train's controller, placement group, worker
  processes, torch process group);
- to_train (no Ray): launch -> ``train()`` (imports, checks, process group);
- engine: model + DeepSpeed engine (on a cold machine: DeepSpeed compiles its CPU collectives op);
- data, restore: the data reader; looking for a checkpoint;
- first_step: the first optimizer step itself;
- launch_to_first_step and workers_to_first_step (the issue's target: 15 s on a warm machine).

    .venv/bin/python bench/startup.py

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["partition=0", "global_batch_size=16", "steps=2", "log_every=1", "checkpoint.every=100"]


def prepare(root: str) -> str:
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.data.partition import PartitionConfig, partition
    from ddm.store import Store

    store = Store(root)
    ingest(IngestConfig(shard_size=1000), store)
    partition(PartitionConfig(num_partitions=2, num_fine=64), store)
    return root


def run(cmd: list[str], env: dict) -> tuple[float, dict]:
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{out.stderr[-3000:]}")
    return t0, json.loads(out.stdout[out.stdout.index("{") :])


def breakdown(t0: float, s: dict) -> dict:
    st = s["startup"]
    entry = st["started_at"]
    inner = st["engine_s"] + st["data_s"] + st["restore_s"]
    out = {
        "engine": st["engine_s"],
        "data": st["data_s"],
        "restore": st["restore_s"],
        "first_step": st["first_step_s"] - inner,
        "workers_to_first_step": st["first_step_s"],
        "launch_to_first_step": entry + st["first_step_s"] - t0,
    }
    if "fit_called_at" in s:
        out = {"to_ray_fit": s["fit_called_at"] - t0, "ray_workers": entry - s["fit_called_at"], **out}
    else:
        out = {"to_train": entry - t0, **out}
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "RAY_ADDRESS")}
    env.setdefault("DS_ACCELERATOR", "cpu")
    figures = {}
    with tempfile.TemporaryDirectory(prefix="ddm-bench-start-") as tmp:
        data = prepare(os.path.join(tmp, "data"))
        for machine in ("cold", "warm"):
            extra = {"TORCH_EXTENSIONS_DIR": os.path.join(tmp, "ext-empty")} if machine == "cold" else {}
            for how, cmd in (
                ("ray", [sys.executable, "-m", "ddm.cli", "train", "expert", "ray.num_workers=2"]),
                ("no_ray", [sys.executable, "-m", "ddm.train"]),
            ):
                store = os.path.join(tmp, f"{machine}-{how}")
                subprocess.run(["cp", "-r", data, store], check=True)
                t0, s = run([*cmd, f"store={store}", *TRAIN], {**env, **extra})
                figures[f"{machine}_{how}"] = breakdown(t0, s)
                print(f"{machine:>4} {how:>6}: {figures[f'{machine}_{how}']}", flush=True)
    warm = figures["warm_ray"]["workers_to_first_step"]
    figures["target_workers_to_first_step_s"] = 15
    figures["warm_meets_target"] = warm <= 15 and figures["warm_no_ray"]["workers_to_first_step"] <= 15
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
