"""The paper's headline at small scale: a K-expert ensemble against a monolith with the same total
training FLOPs (router included), on digits, over several seeds.

Each seed is one ``ddm run`` of the spec (default ``launch/digits.yaml``, which trains the
equal-FLOP monolith beside the experts) into its own store; the table averages the evaluation
(FD-classifier by default) over seeds, per rule. Re-running reuses every finished seed.

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

    from ddm.store import Store

    per_seed = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        store = f"{args.root}/s{seed}"
        cmd = [sys.executable, "-m", "ddm.cli", "--log-level", "WARNING", "run", args.spec]
        cmd += [f"store={store}", f"seed={seed}", "monolith=true", *args.overrides]  # the seed drives evaluation too
        print(f"seed {seed}: {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        per_seed[seed] = Store(store).read_json("report/results.json")  # the evaluation of this run's ensemble

    first = next(iter(per_seed.values()))
    rules = [r["rule"] for r in first["rules"]]
    rows = {}
    for rule in rules:
        vals = [next(r["distance"] for r in res["rules"] if r["rule"] == rule) for res in per_seed.values()]
        fwd = next(r["expert_forwards_per_sample"] for r in first["rules"] if r["rule"] == rule)
        rows[rule] = {
            "mean": statistics.mean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "per_seed": vals,
            "expert_forwards_per_sample": fwd,
        }
    floor = statistics.mean(res["data_floor"] for res in per_seed.values())
    print(f"\n{first['metric_label']}, lower is better; {len(args.seeds)} seeds; data floor {floor:.3f}\n")
    print("| rule | distance (mean ± std) | per seed | expert forwards / sample |")
    print("|---|---:|---|---:|")
    for rule, r in rows.items():
        print(
            f"| {rule} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | "
            f"{r['expert_forwards_per_sample']:.0f} |"
        )
    best_ens = min((r for r in rows if r != "monolith"), key=lambda r: rows[r]["mean"])
    out = {
        "spec": args.spec,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "metric": first["metric"],
        "data_floor": floor,
        "rules": rows,
        "top1_over_monolith": rows["top-1"]["mean"] / rows["monolith"]["mean"]
        if "monolith" in rows and "top-1" in rows
        else None,
        "best_ensemble_rule": best_ens,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
