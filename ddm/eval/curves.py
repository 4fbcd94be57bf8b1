"""Learning curves: every arm of one budget measured at the same points over training, against
training FLOPs (the paper's Figure 4) and against sequential steps: the steps of the arm's longest
job, what a user waits for when every island runs at once. At equal FLOPs the ensemble and the
small-batch monolith have the same per-model batch, but the monolith takes K times the steps in a
row; the second panel shows that gap.

Point i of P is each job's EMA model at round(i * steps / P) of its steps (the job keeps it as
``snapshots/step_N/export/``, ``checkpoint.snapshots``), so at every point the arms have spent the
same training FLOPs, within a step (``ddm.train.budget``). The ensemble's point i combines the experts'
and the router's snapshots i. Every point is measured by the final evaluation's ``Judge`` (the same
metric, labels and initial noise), and filed under ``eval/curves/<name>/`` with the sha256 of the
weights it measured, so a re-run reuses every finished point and measures only new ones.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict

from ddm.core.config import from_dict
from ddm.core.logs import progress
from ddm.distributed.parallel import resolve_device
from ddm.ensemble.assemble import export_record, read_ensemble
from ddm.ensemble.combine import Ensemble, Rule
from ddm.ensemble.sample import STREAMS
from ddm.eval.adherence import ADHERENCE_VERSION
from ddm.eval.evaluate import EvalConfig, Judge, single_model_dir
from ddm.models.exports import LazyModel, weights_sha256
from ddm.models.text_encoder import check_encoder
from ddm.store import Store, layout
from ddm.train.job import JobConfig

log = logging.getLogger("ddm.eval.curves")
# Of each point in curves.json (the point files add the models).
KEYS = ("point", "training_flops", "sequential_steps", "distance")
ADHERENCE = ("prompt_adherence", "adherence_chance", "prompt_retrieval", "retrieval_chance")  # text models' points


def snapshot(store: Store, run_dir: str, point: int, points: int) -> tuple[dict, float] | None:
    """({"dir", "sha256"} of the job's EMA snapshot at point/points of its training, its training
    FLOPs up to there), or None when the job kept no snapshot there (trained without snapshots,
    or extended after them)."""
    run = store.child(run_dir)
    if not run.is_committed(layout.EXPORT):
        return None
    final = int(run.manifest(layout.EXPORT)["step"])
    step = max(1, round(point * final / points))
    folder = layout.snapshot_dir(run_dir, step)
    if not store.is_committed(f"{folder}/{layout.EXPORT}"):
        return None
    cfg = from_dict(JobConfig, run.read_json(layout.JOB_CONFIG))
    where = f"{store.url}/{folder}/{layout.EXPORT}/MANIFEST.json"
    sha = layout.check_digest(weights_sha256(store.child(folder).manifest(layout.EXPORT)), where)
    return {"dir": folder, "sha256": sha, "step": step}, cfg.flops_per_step() * step


def learning_curves(store: Store, cfg: EvalConfig, points: int, rules: list[str], baselines: list[str]) -> dict:
    """Measure the ensemble under ``rules`` and each one-model baseline (``baselines``: monolith,
    monolith-small-batch) at ``points`` points; returns (and writes as ``curves.json`` +
    ``curves.png``) the series, their training FLOPs and where the ensemble and a baseline cross."""
    cfg = cfg.seeded()
    device = resolve_device(cfg.device)
    desc = read_ensemble(store)  # checked: its folders stay inside the store
    measures = {"adherence": ADHERENCE_VERSION} if desc.get("text") else {}  # a new measure: measured again
    settings = {"config": asdict(cfg), "points": points, "streams": STREAMS, **measures}
    name = f"s{cfg.seed}-{layout.ensemble_id(desc)}-{layout.short_digest(settings)}"
    out = store.child(layout.curves_dir(name))
    judge: Judge | None = None  # built only when a point needs measuring
    series: dict[str, list[dict]] = {}
    reused = measured = 0
    arms = [str(Rule.parse(r)) for r in rules] + list(baselines)
    for arm in progress(arms, desc="learning curves", unit="arm"):
        series[arm] = []
        for i in range(1, points + 1):
            if arm in baselines:
                parts = [snapshot(store, single_model_dir(arm, desc), i, points)]
            else:
                dirs = [e["dir"] for e in desc["experts"]] + [desc["router"]["dir"]]
                parts = [snapshot(store, d, i, points) for d in dirs]
            if any(p is None for p in parts):
                log.info("%s: no snapshots for point %d of %d; skipped", arm, i, points)
                continue
            models = [p[0] for p in parts]
            point = {"point": i, "training_flops": sum(p[1] for p in parts), "models": models}
            point["sequential_steps"] = max(m["step"] for m in models)  # its jobs run at once
            fname = f"{arm.replace(':', '_')}-{i:02d}.json"
            kept = out.read_json(fname) if out.exists(fname) else None
            if kept and kept["models"] == models:
                series[arm].append({**kept, "sequential_steps": point["sequential_steps"]})
                reused += 1
                continue
            if judge is None:
                judge = Judge(store, cfg, desc, device)
            if judge.text:  # each snapshot was trained with the encoder that reads the prompts now
                for m in models:
                    check_encoder(export_record(store, m["dir"]), judge.encoder, f"{store.url}/{m['dir']}/export")
            if arm in baselines:
                model = LazyModel(store, models[0], device=device).load()
                distance, x = judge.measure(judge.single_model(model))
            else:
                experts = [LazyModel(store, m, device=device) for m in models[:-1]]
                router = LazyModel(store, models[-1], device=device)
                router.load()
                distance, x = judge.measure(judge.ensemble(Ensemble(experts, router, Rule.parse(arm))))
            point["distance"] = distance
            adherence = judge.adherence(x)  # text models: how well samples show their prompts
            if adherence is not None:
                point["prompt_retrieval"] = adherence["retrieval"]
                point["retrieval_chance"] = adherence["retrieval_chance"]
                if adherence["accuracy"] is not None:
                    point["prompt_adherence"], point["adherence_chance"] = adherence["accuracy"], adherence["chance"]
            out.write_json(fname, point)
            series[arm].append(point)
            measured += 1
            log.info("%s point %d/%d: %.3g training FLOPs, %s %.3f", arm, i, points, point["training_flops"],
                     cfg.metric, distance)  # fmt: skip
    crossings = [
        c for rule in arms if rule not in baselines for base in baselines
        for c in crossings_of(series[rule], series[base], rule, base)
    ]  # fmt: skip
    result = {
        **settings,
        "dir": layout.curves_dir(name),
        "metric": cfg.metric,
        "series": {a: [{k: p[k] for k in (*KEYS, *ADHERENCE) if k in p} for p in s] for a, s in series.items()},
        "crossings": crossings,
        "points_reused": reused,
        "points_measured": measured,
    }
    out.write_bytes("curves.png", plot(result))
    out.write_json("curves.json", result)
    log.info("learning curves: %d points measured, %d reused -> %s", measured, reused, out.url)
    return result


def crossings_of(ensemble: list[dict], baseline: list[dict], rule: str, base: str) -> list[dict]:
    """Every place the ensemble's curve crosses the baseline's (points at equal FLOPs), in order,
    interpolated linearly in log FLOPs; empty when one stays ahead at every shared point. The
    last crossing's `ensemble_ahead_after` says who finishes ahead."""
    by_point = {p["point"]: p for p in baseline}
    pairs = [(e, by_point[e["point"]]) for e in ensemble if e["point"] in by_point]
    out = []
    for (e0, b0), (e1, b1) in zip(pairs, pairs[1:]):
        d0, d1 = e0["distance"] - b0["distance"], e1["distance"] - b1["distance"]
        if d0 * d1 < 0 or (d0 != 0 and d1 == 0):
            f0, f1 = math.log(e0["training_flops"]), math.log(e1["training_flops"])
            flops = math.exp(f0 + (f1 - f0) * d0 / (d0 - d1))
            out.append({"rule": rule, "baseline": base, "training_flops": flops, "ensemble_ahead_after": d1 < 0})
    return out


def plot(result: dict) -> bytes:
    """Distance against training FLOPs (crossings marked) and against sequential steps, one line
    per arm, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_flops, by_steps) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    fixed = {"monolith": "C1", "monolith-small-batch": "C2", "top-1": "C0"}  # the same colours in every report
    others = iter(f"C{i}" for i in range(3, 10))
    for arm, s in result["series"].items():
        if s:
            style = "s--" if arm.startswith("monolith") else "o-"
            color = fixed.get(arm) or next(others, None)
            distance = [p["distance"] for p in s]
            by_flops.plot([p["training_flops"] for p in s], distance, style, label=arm, color=color)
            by_steps.plot([p["sequential_steps"] for p in s], distance, style, label=arm, color=color)
    for c in result["crossings"]:
        by_flops.axvline(c["training_flops"], color="gray", ls=":", lw=1)
    by_flops.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=f"{result['metric']} (lower is better)")
    by_flops.set_title("at equal training FLOPs", fontsize=10)
    by_steps.set(xscale="log", xlabel="sequential steps (every island at once)")
    by_steps.set_title("against the steps a user waits for", fontsize=10)
    for ax in (by_flops, by_steps):
        ax.grid(alpha=0.3, which="both")
    by_flops.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def format_curves(result: dict) -> list[str]:
    """The curves as a markdown table (one row per point, one column per arm) and the crossings."""
    arms = [a for a, s in result["series"].items() if s]
    if not arms:
        return ["No learning-curve points: the jobs kept no snapshots (budget.curve_points)."]
    points = sorted({p["point"] for a in arms for p in result["series"][a]})
    flops = {p["point"]: p["training_flops"] for p in result["series"][arms[0]]}
    lines = ["| point | training FLOPs | " + " | ".join(arms) + " |", "|---:|---:|" + "---:|" * len(arms)]
    for i in points:
        cells = []
        for a in arms:
            p = next((p for p in result["series"][a] if p["point"] == i), None)
            adherence = "" if p is None or "prompt_retrieval" not in p else f" ({p['prompt_retrieval']:.2f}"
            adherence += "" if p is None or "prompt_adherence" not in p else f", {p['prompt_adherence']:.2f}"
            cells.append("" if p is None else f"{p['distance']:.3f}{adherence}{')' if adherence else ''}")
        lines.append(f"| {i} | {flops.get(i, float('nan')):.3g} | " + " | ".join(cells) + " |")
    points = [p for a in arms for p in result["series"][a]]
    chance = next((p["retrieval_chance"] for p in points if "retrieval_chance" in p), None)
    if chance is not None:
        classes = next((p["adherence_chance"] for p in points if "adherence_chance" in p), None)
        also = f", then the class adherence (chance {classes:.3f})" if classes is not None else ""
        lines += ["", f"In brackets: prompt retrieval (chance {chance:.3f}){also}."]
    lines.append("")
    for rule in (a for a in arms if not a.startswith("monolith")):
        for base in (a for a in arms if a.startswith("monolith")):
            cs = [c for c in result["crossings"] if (c["rule"], c["baseline"]) == (rule, base)]
            if cs:
                at = ", ".join(f"{c['training_flops']:.3g}" for c in cs)
                ahead = rule if cs[-1]["ensemble_ahead_after"] else base
                times = "once" if len(cs) == 1 else f"{len(cs)} times"
                lines.append(f"- {rule} and {base} cross {times} (at {at} FLOPs); {ahead} is ahead at the end.")
                continue
            last = {p["point"]: p["distance"] for p in result["series"][base]}
            shared = [p for p in result["series"][rule] if p["point"] in last]
            if shared:
                ahead = rule if shared[-1]["distance"] < last[shared[-1]["point"]] else base
                lines.append(f"- {rule} and {base} do not cross: {ahead} is ahead at every point.")
    lines += _waits(result, arms)
    return lines


def _waits(result: dict, arms: list[str]) -> list[str]:
    """What each baseline makes a user wait for beside the ensemble: sequential steps at the last
    point they share (the right panel)."""
    rule = next((a for a in arms if not a.startswith("monolith")), None)
    if rule is None:
        return []
    out = []
    for base in (a for a in arms if a.startswith("monolith")):
        steps = {p["point"]: p["sequential_steps"] for p in result["series"][base]}
        shared = [p for p in result["series"][rule] if p["point"] in steps]
        if shared:
            p = shared[-1]
            ens, mono = p["sequential_steps"], steps[p["point"]]
            out.append(
                f"- At point {p['point']}, at equal training FLOPs, {rule} has waited {ens} sequential steps and "
                f"{base} {mono} ({mono / ens:.2f}x): the ensemble's experts train at once, one model's steps "
                "come one after another (right panel)."
            )
    return out
