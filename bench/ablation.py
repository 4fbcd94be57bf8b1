"""The paper's ablations at small scale: the number of experts K at a fixed global batch, and
semantic against random partitions, every rule at each point.

Each point is one ``ddm run`` of the spec (default ``launch/digits.yaml``) under the paper's split
(``budget.split=batch``: every expert at B/K for the same S steps, so a larger K divides the batch
more finely: the paper's 16 experts "train poorly as the global batch size is divided too
aggressively") into ``<root>/k<K>-<method>``, with ``partition.method`` kmeans (semantic, the
paper's) or random (a seeded, balanced random split). The monolith at B for S steps is the same
model for every K (the router's FLOPs, which it also gets, differ only in its K outputs), so it is
trained once, in the first point's store, and is every point's reference. All points share the
seed, hence the evaluation's labels and initial noise. Re-running reuses every finished point.

    .venv/bin/python bench/ablation.py [--ks 2 4 8 16] [--methods kmeans random] [--root runs/ablation/digits]
        [key=value ...]   (spec overrides for every point; default expert.steps=3000)

Prints a markdown table and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from headline import run_seed  # noqa: E402 - the benchmark next door

RULES = ["top1", "top2", "full", "oracle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="launch/digits.yaml")
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["kmeans", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="runs/ablation/digits")
    parser.add_argument("overrides", nargs="*", default=[], help="spec overrides for every point")
    args = parser.parse_args()
    overrides = ["expert.steps=3000", *args.overrides]  # later words win: the user's steps replace ours

    t0 = time.perf_counter()
    points, reference = [], None
    for method in args.methods:
        for k in args.ks:
            first = reference is None
            rules = RULES + (["monolith"] if first else [])
            point = [
                f"partition.num_partitions={k}",
                f"partition.method={method}",
                "budget.split=batch",
                "budget.small_batch_monolith=false",
                "budget.curve_points=0",
                f"evaluate.rules=[{','.join(rules)}]",
                *overrides,
            ]
            store = f"{args.root}/k{k}-{method}"
            # run_seed adds monolith=true; every point but the first drops it again (one reference).
            results = run_seed(args.spec, args.seed, store, point + ([] if first else ["monolith=false"]))
            dist = {r["rule"]: r["distance"] for r in results["rules"]}
            if first:
                reference = {"distance": dist["monolith"], "store": store, "arms": results.get("arms")}
            arms = results.get("arms", {}).get("ensemble", {})
            row = {
                "k": k,
                "method": method,
                "per_expert_batch": arms.get("per_model_batch"),
                "training_flops": arms.get("training_flops"),
                "rules": {r: d for r, d in dist.items() if r != "monolith"},
                "router_accuracy": results["router_accuracy"],
                "data_floor": results["data_floor"],
            }
            row["best_rule"] = min(row["rules"], key=row["rules"].get)
            row["top1_over_monolith"] = row["rules"]["top-1"] / reference["distance"]
            points.append(row)
            print(f"K={k} {method}: " + ", ".join(f"{r} {d:.3f}" for r, d in row["rules"].items()), flush=True)

    rule_names = list(points[0]["rules"])
    print(f"\nFD-classifier (lower is better), seed {args.seed}, {args.spec} {' '.join(overrides)}")
    print(f"monolith at the global batch (the reference for every row): {reference['distance']:.3f}\n")
    print("| K | partitions | per-expert batch | " + " | ".join(rule_names) + " | top-1 / monolith |")
    print("|---:|---|---:|" + "---:|" * (len(rule_names) + 1))
    for p in points:
        cells = " | ".join(f"{p['rules'][r]:.3f}" if r in p["rules"] else "" for r in rule_names)
        print(f"| {p['k']} | {p['method']} | {p['per_expert_batch']} | {cells} | {p['top1_over_monolith']:.3f} |")
    best_k = {
        m: min((p for p in points if p["method"] == m), key=lambda p: p["rules"]["top-1"])["k"] for m in args.methods
    }
    out = {
        "spec": args.spec,
        "overrides": overrides,
        "seed": args.seed,
        "monolith": reference,
        "points": points,
        "best_k_top1": best_k,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
