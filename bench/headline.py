"""The paper's headline at small scale: a K-expert ensemble against monoliths with the same total
training FLOPs (router included), over several seeds, with learning curves and what each costs.

Each seed is one ``ddm run`` of the spec (default ``launch/digits.yaml``; ``launch/glyphs.yaml`` is
the richer dataset, ``launch/glyphs_text.yaml`` its text-to-image form, whose tables add the prompt
adherence) into its own store ``<root>/s<seed>``, with the equal-FLOP monoliths of the
spec's budget (``ddm.train.budget``: by default the paper's split, experts at B/K for S steps against a
monolith at B for S steps and one at B/K for K*S steps); the seed drives training, sampling and
evaluation. The tables average over seeds: the evaluation (FD-classifier by default) per rule with
its sampling FLOPs per sample, each arm's budget (training FLOPs, batch, optimizer and sequential
steps), and the learning curves (each arm at the same shares of its training, hence equal FLOPs)
with where the ensemble and each monolith cross. Re-running reuses every finished seed.

    .venv/bin/python bench/headline.py [--spec launch/digits.yaml] [--seeds 0 1 2] [--root runs/headline]
    .venv/bin/python bench/headline.py ... budget.split=steps expert.steps=1500 budget.small_batch_monolith=false
        (ddm 0.2's comparison: every expert at B for S steps, the monolith K*S steps)

Prints markdown tables (mean ± standard deviation over seeds) and, last, a JSON object.
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


def summarize_curves(per_seed: dict[int, dict]) -> dict:
    """Per arm and point over seeds: mean FLOPs, mean ± std distance; crossings of every seed."""
    seeds = [res["curves"] for res in per_seed.values() if res.get("curves")]
    if not seeds:
        return {}
    out = {"series": {}, "crossings_per_seed": [c["crossings"] for c in seeds]}
    for arm, points in seeds[0]["series"].items():
        rows = []
        for p in points:
            same = [q for c in seeds for q in c["series"].get(arm, []) if q["point"] == p["point"]]
            ds = [q["distance"] for q in same]
            rows.append({
                "point": p["point"],
                "training_flops": statistics.mean(q["training_flops"] for q in same),
                "mean": statistics.mean(ds),
                "std": statistics.stdev(ds) if len(ds) > 1 else 0.0,
                "per_seed": ds,
            })  # fmt: skip
            for key in ("prompt_retrieval", "prompt_adherence"):  # text models
                if all(key in q for q in same):
                    rows[-1][key] = statistics.mean(q[key] for q in same)
        out["series"][arm] = rows
    return out


def plot_mean_curves(curves: dict, metric: str, path: str) -> None:
    """The seeds' mean learning curves as one PNG (``ddm.eval.curves.plot``), crossings of the means marked."""
    from ddm.eval.curves import crossings_of, plot

    series = {a: [{**p, "distance": p["mean"]} for p in s] for a, s in curves["series"].items()}
    bases = [a for a in series if a.startswith("monolith")]
    crossings = [c for r in series if r not in bases for b in bases for c in crossings_of(series[r], series[b], r, b)]
    with open(path, "wb") as f:
        f.write(plot({"series": series, "crossings": crossings, "metric": metric}))


def curve_table(curves: dict) -> list[str]:
    arms = list(curves["series"])
    lines = ["| point | training FLOPs | " + " | ".join(arms) + " |", "|---:|---:|" + "---:|" * len(arms)]
    first = curves["series"][arms[0]]
    for i, p in enumerate(first):
        cells = []
        for a in arms:
            q = next((q for q in curves["series"][a] if q["point"] == p["point"]), None)
            text = [f"{q[k]:.2f}" for k in ("prompt_retrieval", "prompt_adherence") if q is not None and k in q]
            cells.append(
                "" if q is None else f"{q['mean']:.3f} ± {q['std']:.3f}" + (f" ({', '.join(text)})" if text else "")
            )
        lines.append(f"| {p['point']} | {p['training_flops']:.3g} | " + " | ".join(cells) + " |")
    return lines


def arm_table(arms: dict) -> list[str]:
    lines = [
        "| arm | models | global batch | per-model batch | optimizer steps | sequential steps | training FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in arms.items():
        lines.append(
            f"| {name} | {a['models']} | {a['global_batch']} | {a['per_model_batch']} | {a['optimizer_steps']} | "
            f"{a['sequential_steps']} | {a['training_flops']:.3g} |"
        )
    return lines


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
        for key in ("prompt_retrieval", "prompt_adherence"):  # text models (ddm.eval.adherence)
            vals = [next(r.get(key) for r in res["rules"] if r["rule"] == rule) for res in per_seed.values()]
            if None not in vals:
                rows[rule][key] = {
                    "mean": statistics.mean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "per_seed": vals,
                }
    return rows


def table(rows: dict) -> list[str]:
    extra = [k for k in ("prompt_retrieval", "prompt_adherence") if all(k in r for r in rows.values())]
    lines = [
        "| rule | distance (mean ± std) | per seed | expert + router forwards / sample | sampling MFLOPs / sample |"
        + "".join(f" {k.replace('_', ' ')} (mean ± std) |" for k in extra),
        "|---|---:|---|---:|---:|" + "---:|" * len(extra),
    ]
    for rule, r in rows.items():
        flops = r["sampling_flops_per_sample"]
        lines.append(
            f"| {rule} | {r['mean']:.3f} ± {r['std']:.3f} | {', '.join(f'{v:.3f}' for v in r['per_seed'])} | "
            f"{r['expert_forwards_per_sample']:.0f} + {r['router_forwards_per_sample'] or 0:.0f} | "
            f"{'' if flops is None else f'{flops / 1e6:.1f}'} |"
            + "".join(f" {r[k]['mean']:.3f} ± {r[k]['std']:.3f} |" for k in extra)
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
    if first.get("arms"):
        print("\nThe arms (seed 0's; every seed trains the same):\n")
        print("\n".join(arm_table(first["arms"])))
    curves = summarize_curves(per_seed)
    if curves:
        print("\nLearning curves (mean ± std over seeds):\n")
        print("\n".join(curve_table(curves)))
        for seed, crossings in zip(per_seed, curves["crossings_per_seed"]):
            text = "; ".join(
                f"{c['rule']} x {c['baseline']} at {c['training_flops']:.3g} FLOPs "
                f"({'ensemble' if c['ensemble_ahead_after'] else 'monolith'} ahead after)"
                for c in crossings
            )
            print(f"seed {seed}: {text or 'no crossing'}")
        plot_mean_curves(curves, first["metric"], f"{args.root}/curves.png")
        print(f"mean learning curves: {args.root}/curves.png")
    prompts = [res["prompts"] for res in per_seed.values() if res.get("prompts")]
    chance = [p["adherence_chance"] for p in prompts if p.get("adherence_chance") is not None]
    if prompts:
        print(
            f"\nIn brackets in the curves: prompt retrieval (chance {prompts[0]['retrieval_chance']:.3f}, data images "
            f"{statistics.mean(p['retrieval_data'] for p in prompts):.3f}), then the class adherence (chance "
            f"{statistics.mean(chance) if chance else float('nan'):.3f})"
        )
    best_ens = min((r for r in rows if not r.startswith("monolith")), key=lambda r: rows[r]["mean"])
    out = {
        "spec": args.spec,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "metric": first["metric"],
        "data_floor": floor,
        "rules": rows,
        "training_flops": training,
        "arms": first.get("arms"),
        "curves": curves,
        "forward_flops": first.get("forward_flops"),
        "top1_over_monolith": rows["top-1"]["mean"] / rows["monolith"]["mean"]
        if "monolith" in rows and "top-1" in rows
        else None,
        "top1_over_small_batch_monolith": rows["top-1"]["mean"] / rows["monolith-small-batch"]["mean"]
        if "monolith-small-batch" in rows and "top-1" in rows
        else None,
        "best_ensemble_rule": best_ens,
        "adherence_chance": statistics.mean(chance) if chance else None,
        "retrieval_chance": prompts[0]["retrieval_chance"] if prompts else None,
        "retrieval_data": statistics.mean(p["retrieval_data"] for p in prompts) if prompts else None,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
