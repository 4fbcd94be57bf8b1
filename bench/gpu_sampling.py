"""Top-1 ensemble sampling against one expert's sampling on one GPU, side by side.

Four DiT-B/2 experts (random, non-zero weights; how the router splits the batch is printed) and a
DiT-S/2 router on 32x32x4 latents, combined by ``ddm.ensemble.combine.Ensemble`` with the top-1 rule,
sample a batch with the same sampler, steps and noise as one expert alone. The ratio is what top-1
routing costs on top of the expert forwards it needs: the router, the per-expert gathers and
scatters, and four smaller expert calls instead of one. ``--precision bf16`` samples under bf16
autocast (the ODE state stays fp32); ``--compile`` compiles the networks (dynamic batch sizes).

    python bench/gpu_sampling.py [--batch 256] [--steps 20] [--precision bf16] [--compile]

Needs CUDA; the last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddm.ensemble.combine import Ensemble, Rule
from ddm.models.build import build_model, build_router
from ddm.models.config import ModelConfig
from ddm.models.flow import FlowMatching

SHAPE = (4, 32, 32)


def random_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.cuda().eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--arch", default="DiT-B/2")
    parser.add_argument("--router-arch", default="DiT-S/2")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sampling needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(args.arch, SHAPE, num_classes=1000)
    experts = [random_weights(build_model(cfg), i) for i in range(args.experts)]
    router = random_weights(build_router(ModelConfig(args.router_arch, SHAPE, num_classes=1000), args.experts), 99)
    if args.compile:
        experts = [torch.compile(e, dynamic=True) for e in experts]
        router = torch.compile(router, dynamic=True)
    ensemble = Ensemble(experts, router, Rule("top1"))
    flow = FlowMatching()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch, *SHAPE, generator=g).cuda()
    labels = torch.randint(0, 1000, (args.batch,), generator=g).cuda()

    def sample(velocity) -> None:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=args.precision == "bf16"):
            flow.sample(lambda x, t: velocity(x, t).float(), noise, args.steps, "euler")

    def one_expert() -> None:
        sample(lambda x, t: experts[0](x, t, labels))

    def top1() -> None:
        sample(ensemble.velocity_fn(y=labels))

    for fn in (one_expert, top1):  # warm-up (and compilation)
        fn()
    pairs = [(timed(one_expert, 1), timed(top1, 1)) for _ in range(args.repeats)]  # back to back
    expert_s = statistics.median(p[0] for p in pairs)
    top1_s = statistics.median(p[1] for p in pairs)
    ensemble.reset_stats()
    top1()
    split = [n // args.steps for n in ensemble.stats.expert_evals]
    figures = {
        "device": torch.cuda.get_device_name(),
        "experts": args.experts,
        "arch": args.arch,
        "router": args.router_arch,
        "batch": args.batch,
        "steps": args.steps,
        "precision": args.precision,
        "compiled": args.compile,
        "one_expert_s": expert_s,
        "top1_s": top1_s,
        "top1_over_one_expert": top1_s / expert_s,
        "rows_per_expert_per_step": split,
    }
    print(
        f"{figures['device']}: top-1 of {args.experts} x {args.arch} {top1_s * 1000:.0f} ms vs one expert "
        f"{expert_s * 1000:.0f} ms for {args.batch} samples x {args.steps} steps: "
        f"{figures['top1_over_one_expert']:.3f}x (rows per expert and step {split})"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
