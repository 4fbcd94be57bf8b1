"""``ddm run``'s report: ``report/README.md`` with the jobs, the per-rule table, sample grids and the
router's accuracy against t, plus ``report/results.json`` (the evaluation of the run's ensemble)."""

from __future__ import annotations

import json
import logging

from ddm import layout
from ddm.config import to_dict
from ddm.evaluate import format_report
from ddm.job import JobConfig
from ddm.store import Store

log = logging.getLogger("ddm.report")


def write_report(
    store: Store,
    spec,
    data: dict,
    parts: dict,
    configs: list[JobConfig],
    samples: dict,
    results: dict,
    timings: dict[str, float],
) -> None:
    """What was trained, how long it took, how good it is (``spec``: the run's RunSpec)."""
    rep = store.child(layout.REPORT_DIR)
    lines = [
        "# DDM run report",
        "",
        f"Store `{spec.store}` · dataset `{spec.ingest.source}`: {data['num_samples']} samples of shape "
        f"{tuple(data['sample_shape'])}, {data['num_classes']} classes · K = {parts['num_partitions']} partitions, "
        f"sizes {parts['counts']}",
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
    lines += ["", "## Quality by rule", "", format_report(results), "![router accuracy](router_accuracy.png)", ""]
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
    lines += ["## Stage times (this invocation)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", "Spec:", "", "```json", json.dumps(to_dict(spec), indent=1), "```", ""]
    rep.write_bytes("README.md", "\n".join(lines).encode())
    rep.write_json("results.json", results)
    log.info("report -> %s/README.md", rep.url)
