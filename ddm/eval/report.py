"""``ddm run``'s report: ``report/README.md`` with the jobs, the per-rule table (quality, sampling
FLOPs, training FLOPs of each arm), sample grids, the router's accuracy against t and the stage times
of every invocation, plus ``report/results.json`` (the evaluation of the run's ensemble) and
``report/history.json`` (each invocation's start and stage times, appended, never overwritten)."""

from __future__ import annotations

import json
import logging
import time

from ddm.core.config import to_dict
from ddm.core.secrets import redact_url, redact_urls
from ddm.eval.curves import format_curves
from ddm.eval.evaluate import format_report
from ddm.store import Store, layout
from ddm.train.budget import describe
from ddm.train.job import JobConfig

log = logging.getLogger("ddm.eval.report")


def write_report(
    store: Store,
    spec,
    data: dict,
    parts: dict,
    configs: list[JobConfig],
    samples: dict,
    results: dict,
    timings: dict[str, float],
    started_at: float | None = None,
) -> None:
    """What was trained, how long it took, how good it is (``spec``: the run's RunSpec; ``timings``:
    this invocation's stage times, added to the history of earlier ones; ``started_at``: its start
    as a Unix time)."""
    rep = store.child(layout.REPORT_DIR)
    history = rep.read_json(HISTORY) if rep.exists(HISTORY) else []
    started = started_at if started_at is not None else time.time() - sum(timings.values())
    stages = [{"stage": k, "seconds": v} for k, v in timings.items()]  # a list: JSON keeps its order
    history.append({"started_at": _utc(started), "stages": stages, "seconds": sum(timings.values())})
    lines = [
        "# DDM run report",
        "",
        f"Store `{redact_url(spec.store)}` · dataset `{redact_url(spec.ingest.source)}`: {data['num_samples']} "
        f"samples of shape {tuple(data['sample_shape'])}, {data['num_classes']} classes · "
        f"K = {parts['num_partitions']} partitions, sizes {parts['counts']}",
        "",
        "## Training jobs",
        "",
        "| job | model | steps | global batch | final loss | training FLOPs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in configs:
        run = store.child(c.run_dir)
        loss = run.read_json(layout.SUMMARY).get("final_loss") if run.exists(layout.SUMMARY) else None
        flops = c.flops_per_step() * c.steps
        loss_text = "" if loss is None else f"{loss:.4f}"
        lines.append(
            f"| {c.run_dir} | {c.model.arch} | {c.steps} | {c.global_batch_size} | {loss_text} | {flops:.3g} |"
        )
    if results.get("arms"):
        lines += ["", "## The budget: what each arm trained", "", *describe(results["arms"]), "", BUDGET_NOTE]
    lines += ["", "## Quality by rule", "", format_report(results), "![router accuracy](router_accuracy.png)", ""]
    curves = results.get("curves")
    if curves:
        rep.write_bytes("curves.png", store.child(curves["dir"]).read_bytes("curves.png"))
        lines += ["## Learning curves (quality against training FLOPs and against sequential steps)", ""]
        lines += ["![learning curves](curves.png)", ""]
        lines += [
            "Left, every arm at equal training FLOPs; right, the same points against sequential steps, what a "
            "user waits for when every island runs at once. The small-batch monolith matches the experts' batch "
            "and FLOPs but takes K times their steps in a row: the two panels are where they part ways.",
            "",
        ]
        lines += [*format_curves(curves), ""]
    lines += ["## Samples", ""]
    evaluation = store.child(results["dir"])
    for name in (v["rule"] for v in results["rules"]):
        fname = f"{name.replace(':', '_')}.png"
        if evaluation.exists(fname):
            rep.write_bytes(f"samples-{fname}", evaluation.read_bytes(fname))
            lines.append(f"**{name}**\n\n![{name}](samples-{fname})\n")
    rep.write_bytes("router_accuracy.png", evaluation.read_bytes("router_accuracy.png"))
    if store.exists(f"{samples['dir']}/grid.png"):
        rep.write_bytes("sample-grid.png", store.read_bytes(f"{samples['dir']}/grid.png"))
        seed = samples["config"]["seed"]
        lines.append(f"`ddm sample` output ({samples['rule']}, seed {seed}):\n\n![samples](sample-grid.png)\n")
        if store.exists(f"{samples['dir']}/prompts.json"):  # a text ensemble's: the grid's prompts, in order
            rows = json.loads(store.read_bytes(f"{samples['dir']}/prompts.json"))
            prompts = dict.fromkeys((r["prompt"], r["guidance"]) for r in rows)
            lines += ["Prompts (cycled over the grid, row by row):", ""]
            lines += [f"{i}. {p} (guidance {g:g})" for i, (p, g) in enumerate(prompts, 1)] + [""]
    lines += ["## Stage times (seconds, every invocation of `ddm run` on this store)", "", *_history_table(history)]
    lines += ["", "Spec:", "", "```json", redact_urls(json.dumps(to_dict(spec), indent=1)), "```", ""]
    rep.write_json(HISTORY, history)
    rep.write_bytes("README.md", "\n".join(lines).encode())
    rep.write_json("results.json", results)
    log.info("report -> %s/README.md", rep.url)


HISTORY = "history.json"
BUDGET_NOTE = (
    "Global batch: the samples of one sequential step over the arm's models; sequential steps: what a user waits "
    "for when every island runs at once (the router trains beside the experts). See `ddm.train.budget`."
)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _history_table(history: list[dict]) -> list[str]:
    """One row per invocation, one column per stage any of them ran (blank where one did not)."""
    stages: list[str] = []
    for h in history:
        stages += [s["stage"] for s in h["stages"] if s["stage"] not in stages]
    rows = ["| # | started | " + " | ".join(stages) + " | total |", "|---:|---|" + "---:|" * (len(stages) + 1)]
    for i, h in enumerate(history, 1):
        times = {s["stage"]: s["seconds"] for s in h["stages"]}
        cells = [f"{times[s]:.1f}" if s in times else "" for s in stages]
        rows.append(f"| {i} | {h['started_at']} | " + " | ".join(cells) + f" | {h['seconds']:.1f} |")
    return rows
