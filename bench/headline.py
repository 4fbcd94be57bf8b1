"""The paper's headline at small scale: a K-expert ensemble against a monolith with the same total
training FLOPs (router included), over several seeds, with what each costs to sample.

Each seed is one ``ddm run`` of the spec (default ``launch/digits.yaml``; ``launch/glyphs.yaml`` is
the richer dataset) into its own store ``<root>/s<seed>``, with the equal-FLOP monolith; the seed
drives training, sampling and evaluation. The table averages the evaluation (FD-classifier by
default) over seeds, per rule, with the sampling FLOPs per sample (router included) and the
training FLOPs of each arm. Re-running reuses every finished seed.

    .venv/bin/python bench/headline.py [--spec launch/digits.yaml] [--seeds 0 1 2] [--root runs/headline]

Prints a markdown table (mean ± standard deviation over seeds) and, last, a JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def run_seed(spec: str, seed: int, store: str, overrides: list[str]) -> dict:
    """One ``ddm run`` of ``spec`` with the monolith into ``store``; its evaluation (results.json)."""
    from ddm.store import Store

    cmd = [sys.executable, "-m", "ddm.cli", "--log-level", "WARNING", "run", spec]
    cmd += [f"store={store}", f"seed={seed}", "monolith=true", *overrides]  # the seed drives evaluation too
    print(f"seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return Store(store).read_json("report/results.json")  # the evaluation of this run's ensemble


def summarize(per_seed: dict[int, dict]) -> dict:
    """Per rule over seeds: mean, std, per-seed distances and the sampling cost."""
    first = next(iter(per_seed.values()))
    rows = {}
    for rule in [r["rule"] for r in first["rules"]]:
        vals = [next(r["distance"] for r in res["rules"] if r["rule"] == rule) for res in per_seed.values()]
        cost = next(r for r in first["rules"] if r["rule"] == rule)
        rows[rule] = {
            "mean": statistics.mean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_seed": vals,
            "expert_forwards_per_sample": cost["expert_forwards_per_sample"],
            "router_forwards_per_sample": cost.get("router_forwards_per_sample"),
            "sampling_flops_per_sample": cost.get("sampling_flops_per_sample"),
            "router_share": cost.get("router_share"),
        }
    return rows


def table(rows: dict) -> list[str]:
    lines = [
        "| rule | distance (mean ± std) | per seed | expert + router forwards / sample | sampling MFLOPs / sample |",
        "|---|---:|---|---:|---:|",
    ]
    for rule, r in rows.items():
        flops = r["sampling_flops_per_sample"]
        lines.append(
            f"| {rule} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | "
            f"{r['expert_forwards_per_sample']:.0f} + {r['router_forwards_per_sample'] or 0:.0f} | "
            f"{'' if flops is None else f'{flops / 1e6:.1f}'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="launch/digits.yaml")
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--root", default="runs/headline")
    parser.add_argument("overrides", nargs="*", help="spec overrides for every seed, e.g. expert.steps=3000")
    args = parser.parse_args()
    # `--seeds 0 1 2 expert.steps=800`: key=value words after the seeds are overrides, not seeds.
    args.overrides = [w for w in args.seeds if "=" in w] + args.overrides
    args.seeds = [int(w) for w in args.seeds if "=" not in w]

    t0 = time.perf_counter()
    per_seed = {seed: run_seed(args.spec, seed, f"{args.root}/s{seed}", args.overrides) for seed in args.seeds}
    rows = summarize(per_seed)
    first = next(iter(per_seed.values()))
    floor = statistics.mean(res["data_floor"] for res in per_seed.values())
    print(f"\n{first['metric_label']}, lower is better; {len(args.seeds)} seeds; data floor {floor:.3f}\n")
    print("\n".join(table(rows)))
    training = first.get("training_flops", {})
    if training.get("ensemble", {}).get("total"):
        ens = training["ensemble"]
        mono = training.get("monolith", {}).get("total")
        print(f"\ntraining FLOPs: ensemble {ens['total']:.3g} (router {ens['router']:.3g}), monolith {mono:.3g}")
    best_ens = min((r for r in rows if r != "monolith"), key=lambda r: rows[r]["mean"])
    out = {
        "spec": args.spec,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "metric": first["metric"],
        "data_floor": floor,
        "rules": rows,
        "training_flops": training,
        "forward_flops": first.get("forward_flops"),
        "top1_over_monolith": rows["top-1"]["mean"] / rows["monolith"]["mean"]
        if "monolith" in rows and "top-1" in rows
        else None,
        "best_ensemble_rule": best_ens,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
