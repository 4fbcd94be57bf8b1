"""Where DDM starts to pay off: the ensemble/monolith ratio as the data per expert grows, at a fixed
training budget (the same FLOPs for both arms, router included).

Each point is ``bench/headline.py``'s ``ddm run`` of the spec (default ``launch/glyphs.yaml``) with
``ingest.source=glyphs:N`` for one N, into ``<root>/n<N>/s<seed>`` (the spec's own N reuses
``<root>/s<seed>``, the headline's stores). Small N repeats every image many times (the digits
regime: the monolith shares what partitions have in common); large N shows each image a few times.
For each N: images per expert, how often each arm sees an image, FD-classifier of the monolith
and of the ensemble's top-1 rule, their ratio (< 1: the ensemble is better), and sampling FLOPs.

    .venv/bin/python bench/crossover.py [--sizes 2000 8000 32000 128000] [--seeds 0] [--root runs/headline/glyphs]

Prints a markdown table and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from headline import run_seed  # noqa: E402 - the benchmark next door


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="launch/glyphs.yaml")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 8000, 32000, 128000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--root", default="runs/headline/glyphs")
    parser.add_argument("overrides", nargs="*", help="spec overrides for every point, e.g. expert.steps=3000")
    args = parser.parse_args()

    from ddm.core.config import load
    from ddm.launchers.spec import RunSpec, jobs
    from ddm.store import Store

    spec = load(RunSpec, args.spec, args.overrides)
    own = spec.ingest.source
    t0 = time.perf_counter()
    points = []
    for n in args.sizes:
        source = f"glyphs:{n}"
        root = args.root if source == own else f"{args.root}/n{n}"
        overrides = [*args.overrides] + ([] if source == own else [f"ingest.source={source}"])
        results = {s: run_seed(args.spec, s, f"{root}/s{s}", overrides) for s in args.seeds}
        store = Store(f"{root}/s{args.seeds[0]}")
        sizes = store.manifest("partitions")["counts"]
        cfgs = jobs(load(RunSpec, args.spec, [*overrides, "monolith=true"]), len(sizes))
        mono = next(c for c in cfgs if c.job == "expert" and c.partition == -1)
        expert = cfgs[0]

        def dist(rule: str) -> list[float]:
            return [next(r["distance"] for r in res["rules"] if r["rule"] == rule) for res in results.values()]

        mono_d, top1_d = dist("monolith"), dist("top-1")
        ratios = [t / m for t, m in zip(top1_d, mono_d)]
        first = next(iter(results.values()))
        cost = {r["rule"]: r.get("sampling_flops_per_sample") for r in first["rules"]}
        points.append(
            {
                "n": n,
                "images_per_expert": statistics.mean(sizes),
                "monolith_views_per_image": mono.steps * mono.global_batch_size / n,
                "expert_views_per_image": expert.steps * expert.global_batch_size / statistics.mean(sizes),
                "monolith": statistics.mean(mono_d),
                "top1": statistics.mean(top1_d),
                "oracle": statistics.mean(dist("oracle")) if "oracle" in cost else None,
                "top1_over_monolith": statistics.mean(ratios),
                "top1_over_monolith_per_seed": ratios,
                "sampling_flops_per_sample": {"monolith": cost.get("monolith"), "top1": cost.get("top-1")},
                "data_floor": statistics.mean(res["data_floor"] for res in results.values()),
            }
        )
        print(f"N={n}: top-1 / monolith = {points[-1]['top1_over_monolith']:.3f}", flush=True)

    print(f"\nFD-classifier (lower is better), seeds {args.seeds}, {args.spec} {' '.join(args.overrides)}\n")
    print("| images | per expert | views / image (monolith, expert) | monolith | top-1 | oracle | top-1 / monolith |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for p in points:
        oracle = "" if p["oracle"] is None else f"{p['oracle']:.3f}"
        print(
            f"| {p['n']} | {p['images_per_expert']:.0f} | {p['monolith_views_per_image']:.1f}, "
            f"{p['expert_views_per_image']:.1f} | {p['monolith']:.3f} | {p['top1']:.3f} | {oracle} | "
            f"**{p['top1_over_monolith']:.3f}** |"
        )
    wins = [p["n"] for p in points if p["top1_over_monolith"] < 1]
    out = {
        "spec": args.spec,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "points": points,
        "ensemble_better_at": wins,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
