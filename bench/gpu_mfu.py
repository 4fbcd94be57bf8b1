"""Model FLOP utilisation of a DiT-B/2 expert training step in bf16 on one GPU (DeepSpeed engine).

FLOPs are counted analytically by ``ddm.models.dit.dit_forward_flops`` (2 per multiply-add; a
training step is 3x the forward); DiT-B/2 on 32x32x4 latents is 46 GFLOPs per forward (the DiT
paper's 23 GMACs).

    python bench/gpu_mfu.py [--arch DiT-B/2] [--batch 64] [--steps 30] [--peak-tflops 989]

Needs CUDA; the last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, no sparsity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="DiT-B/2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_mfu needs a CUDA GPU")
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import deepspeed

    from ddm.flow import FlowMatching
    from ddm.models.build import build_model
    from ddm.models.config import DIT_SIZES, ModelConfig, dit_forward_flops
    from ddm.parallel import ensure_process_group

    ensure_process_group("nccl")
    size = DIT_SIZES[args.arch]
    cfg = ModelConfig(args.arch, (4, 32, 32), num_classes=1000)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_micro_batch_size_per_gpu": args.batch,
            "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        },  # fmt: skip
    )
    flow = FlowMatching()
    x = torch.randn(args.batch, 4, 32, 32, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = flow.training_losses(engine, x, y)["loss"].mean()
        engine.backward(loss)
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / args.steps
    fwd = dit_forward_flops(size, 32, 4)
    achieved = 3 * fwd * args.batch / step_s
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    figures = {
        "device": name,
        "arch": args.arch,
        "batch": args.batch,
        "forward_gflops_per_sample": fwd / 1e9,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "achieved_tflops": achieved / 1e12,
        "peak_bf16_tflops": peak,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }
    print(
        f"{name}: {args.arch} batch {args.batch}: {step_s * 1e3:.1f} ms/step, {achieved / 1e12:.0f} TFLOPs"
        + (f", MFU {figures['mfu']:.1%}" if peak else "")
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
