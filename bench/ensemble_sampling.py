"""Top-1 ensemble sampling time against one expert's, same steps and batch, side by side.

The ensemble is the demo's: K MLP-S experts and an MLP-XS router. Top-1 runs one expert
forward per sample plus the router, and gathers/scatters rows per expert; the ratio says what
that overhead costs. Runs are interleaved (expert, ensemble, expert, ...) and the median is taken,
so drift on the machine hits both sides alike; the ratio is the median of the back-to-back pairs.

    .venv/bin/python bench/ensemble_sampling.py [--batches 256 2000 8192] [--repeats 5]

The last line printed is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ddm.demo.mixture import DemoConfig
from ddm.ensemble.combine import Ensemble, Rule
from ddm.models.build import build_model, build_router
from ddm.models.flow import FlowMatching


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 2000, 8192])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = DemoConfig()
    flow, steps, method = FlowMatching.of(cfg.flow), cfg.sample_steps, cfg.sampler
    experts = [build_model(cfg.expert).eval() for _ in range(cfg.num_partitions)]
    router = build_router(cfg.router, cfg.num_partitions).eval()
    ens = Ensemble(experts, router, Rule("top1"))
    expert = experts[0]

    figures: dict = {
        "experts": cfg.num_partitions,
        "expert": cfg.expert.arch,
        "router": cfg.router.arch,
        "steps": steps,
        "sampler": method,
        "threads": args.threads,
        "target_ratio": 1.10,
    }
    with torch.no_grad():
        for batch in args.batches:
            noise = torch.randn(batch, cfg.data.dim)
            single = lambda: flow.sample(lambda x, t: expert(x, t), noise, steps, method)  # noqa: E731
            top1 = lambda: flow.sample(ens.velocity_fn(), noise, steps, method)  # noqa: E731
            single(), top1()  # warm-up
            ens.reset_stats()
            t_single, t_top1, ratios = [], [], []
            for _ in range(args.repeats):
                t_single.append(timed(single))
                t_top1.append(timed(top1))
                ratios.append(t_top1[-1] / t_single[-1])
            share = [e / max(sum(ens.stats.expert_evals), 1) for e in ens.stats.expert_evals]
            row = {
                "single_expert_s": statistics.median(t_single),
                "top1_ensemble_s": statistics.median(t_top1),
                "expert_forwards_per_eval": ens.stats.expert_forwards_per_eval,
                "routing_share": [round(s, 3) for s in share],
            }
            row["ratio"] = statistics.median(ratios)  # median of back-to-back pairs
            figures[f"batch_{batch}"] = row
            print(
                f"batch {batch:>6}: one expert {row['single_expert_s']:.3f} s, top-1 ensemble "
                f"{row['top1_ensemble_s']:.3f} s, ratio {row['ratio']:.3f}, routed {row['routing_share']}"
            )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
