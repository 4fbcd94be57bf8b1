"""Model FLOP utilisation of the real training job on one GPU, beside a compiled bare loop.

The job is ddm's train function (``ddm.train.trainer.train``, what Ray Train workers run): the
DeepSpeed engine, bf16 autocast over fp32 weights, torch.compile, the EMA, the partition reader and
two full-state checkpoints (a snapshot to host memory, uploaded to the store in the background).
The bare loop, measured in the same process, is the same model compiled, with torch's fused AdamW
under bf16 autocast, on batches already on the GPU: what the job's machinery costs is the ratio.

FLOPs are counted analytically (``ddm.models.config.forward_flops``: 2 per multiply-add, a step is
3x the forward; DiT-B/2 on 32x32x4 latents is 46 GFLOPs per forward, the DiT paper's 23 GMACs).
The data is synthetic 4x32x32 latents in a local store, so no dataset or scikit-learn is needed.

    python bench/gpu_mfu.py --arch DiT-B/2 --batch 256
    python bench/gpu_mfu.py --arch DiT-XL/2 --batch 128

Needs CUDA; the last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from ddm.data.shards import encode_shard, shard_name, write_parquet_bytes
from ddm.models.build import build_model
from ddm.models.config import ModelConfig, forward_flops
from ddm.models.flow import FlowMatching
from ddm.store import Store, layout
from ddm.train.job import CheckpointConfig, EngineConfig, JobConfig
from ddm.train.objectives import VelocityLoss
from ddm.train.trainer import train

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity
SHAPE = (4, 32, 32)
NUM_CLASSES = 1000


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def latent_store(root: str, num_samples: int, shard_size: int = 4096) -> str:
    """A committed dataset of random fp16 latents with labels, in one partition (no k-means)."""
    store = Store(root)
    rng = np.random.default_rng(0)
    known, rows = {}, []
    for start in range(0, num_samples, shard_size):
        n = min(shard_size, num_samples - start)
        ids = np.arange(start, start + n)
        arrays = rng.standard_normal((n, *SHAPE), dtype=np.float32).astype(np.float16)
        name = shard_name(len(rows))
        raw = encode_shard(ids, arrays, rng.integers(0, NUM_CLASSES, n))
        known[name] = store.write_hashed(f"{layout.DATA_DIR}/{name}", raw)
        rows.append(n)
    meta = {"kind": "ddm.dataset", "format_version": 1, "num_samples": num_samples, "shard_rows": rows}
    meta |= {"sample_shape": list(SHAPE), "dtype": "float16", "num_classes": NUM_CLASSES}
    store.commit(layout.DATA_DIR, list(known), meta=meta, known=known)
    shard = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(rows)])
    row = np.concatenate([np.arange(n, dtype=np.int32) for n in rows])
    table = pa.table(
        {"id": np.arange(num_samples), "shard": shard, "row": row, "fine": np.zeros(num_samples, np.int32)}
    )
    table = table.append_column("partition", pa.array(np.zeros(num_samples, np.int32)))
    known = {
        layout.ASSIGNMENTS: store.write_hashed(
            f"{layout.PARTITIONS_DIR}/{layout.ASSIGNMENTS}", write_parquet_bytes(table)
        )
    }
    meta = {"kind": "ddm.partitions", "format_version": 1, "num_partitions": 1, "counts": [num_samples]}
    store.commit(layout.PARTITIONS_DIR, list(known), meta=meta, known=known)
    return root


def bare_loop(model_cfg: ModelConfig, batch: int, steps: int, warmup: int) -> float:
    """Seconds per step of the compiled model, fused AdamW, bf16 autocast, data already on the GPU."""
    torch.manual_seed(0)
    model = build_model(model_cfg).cuda().train()
    compiled = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective = VelocityLoss(FlowMatching())
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, *SHAPE, device="cuda")
    y = torch.randint(0, NUM_CLASSES, (batch,), device="cuda")
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective(compiled, {"x": x, "y": y}, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    del model, compiled, opt
    torch.cuda.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="DiT-B/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before measuring (the first compiles)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu needs a CUDA GPU")
    logging.basicConfig(level=logging.WARNING)
    name = torch.cuda.get_device_name()
    peak = (args.peak_tflops or peak_tflops(name) or float("nan")) * 1e12
    model_cfg = ModelConfig(args.arch, SHAPE, num_classes=NUM_CLASSES)
    step_flops = 3 * forward_flops(model_cfg) * args.batch

    bare_s = bare_loop(model_cfg, args.batch, args.steps, args.warmup)

    log_every = 10
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="ddm-mfu-") as root:
        cfg = JobConfig(
            store=latent_store(f"{root}/store", num_samples=max(4 * args.batch, 4096)),
            partition=0,
            model=model_cfg,
            steps=total,
            global_batch_size=args.batch,
            log_every=log_every,
            checkpoint=CheckpointConfig(every=total // 2),  # full-state checkpoints mid-run and at the end
            engine=EngineConfig(zero_stage=1),  # precision and compile: the GPU defaults (bf16 autocast, compiled)
        )
        summary = train(cfg)
        run = Store(cfg.store).child(cfg.run_dir)
        metrics = [json.loads(line) for line in run.read_bytes(layout.METRICS).decode().splitlines()]
        ckpt_files = run.child(layout.CHECKPOINTS).manifest(layout.step_dir(total))["files"]
        state_gb = sum(f["size"] for f in ckpt_files.values()) / 1e9
    measured = [m["steps_per_s"] for m in metrics if m["step"] > args.warmup]
    job_s = 1.0 / statistics.median(measured)  # the median window: the one holding the mid-run snapshot is an outlier
    stall_s = summary["checkpoint_stall_s"] / summary["checkpoints_saved"]  # 3 with an odd step count
    figures = {
        "device": name,
        "arch": args.arch,
        "batch": args.batch,
        "peak_tflops": peak / 1e12,
        "bare_step_ms": 1000 * bare_s,
        "job_step_ms": 1000 * job_s,
        "job_over_bare": bare_s / job_s,  # the job's steps/s over the bare loop's
        "bare_mfu": step_flops / bare_s / peak,
        "job_mfu": step_flops / job_s / peak,
        "job_first_step_s": summary["startup"]["first_step_s"],  # includes DeepSpeed start-up and the first compile
        "checkpoint_state_gb": state_gb,
        "checkpoint_stall_ms": 1000 * stall_s,
        "checkpoint_cost_at_1_per_1000_steps": stall_s / (1000 * job_s),
        "bf16": summary["bf16"],
        "compiled": summary["compiled"],
    }
    print(
        f"{name}, {args.arch} batch {args.batch}: job {figures['job_step_ms']:.1f} ms/step "
        f"({100 * figures['job_mfu']:.1f}% MFU), compiled bare loop {figures['bare_step_ms']:.1f} ms/step "
        f"({100 * figures['bare_mfu']:.1f}% MFU), job/bare {figures['job_over_bare']:.3f}; checkpoint of "
        f"{state_gb:.1f} GB stalls training {figures['checkpoint_stall_ms']:.0f} ms "
        f"({100 * figures['checkpoint_cost_at_1_per_1000_steps']:.2f}% at one per 1000 steps)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
