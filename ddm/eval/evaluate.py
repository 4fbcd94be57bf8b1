"""``ddm evaluate``: the ensemble's quality under each rule (metrics in ``ddm.eval.metrics``).

``evaluate(store, cfg)`` samples the store's ensemble under each rule (and the monolith when the
store has one) with the same labels and initial noise (``ddm.ensemble.sample``'s streams), and writes
``eval/<name>/``: ``results.json`` (per rule: the distance, expert and router forwards and
sampling FLOPs per sample, the router's share of them, seconds; the training FLOPs of each arm),
``router_accuracy.png`` (accuracy of the router's argmax against each sample's partition as a
function of t), ``<rule>.png`` sample grids and a ``report.md``. A name that holds results of
other settings is an error: two configs never mix.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict
from typing import Callable

import torch

from ddm.core.logs import progress
from ddm.data.reader import PartitionReader
from ddm.data.sources import held_out_prompts
from ddm.distributed.parallel import resolve_device
from ddm.ensemble.assemble import ensemble_encoder, load_ensemble
from ddm.ensemble.combine import Rule
from ddm.ensemble.cost import ensemble_sampling_cost, export_forward_flops, forward_flops_of, single_model_sampling_cost
from ddm.ensemble.sample import LABELS, RULE_DRAWS, STREAMS, draw, image_grid, stream
from ddm.eval.adherence import ADHERENCE_VERSION, PromptSet
from ddm.eval.metrics import InceptionFeatures, frechet_distance, gaussian_stats, load_or_train_classifier
from ddm.eval.settings import EvalConfig
from ddm.models.exports import LazyModel, read_export, weights_sha256
from ddm.models.flow import FlowMatching, VelocityFn, guided
from ddm.models.text_encoder import check_encoder
from ddm.store import Store, layout
from ddm.train.budget import training_arms, training_flops

log = logging.getLogger("ddm.eval.evaluate")


def metric_label(metric: str) -> str:
    return (
        "FID (Inception-v3, pytorch-fid)"
        if metric == "fid"
        else "FD-classifier (Fréchet distance on a CNN trained on this dataset)"
    )


# One-model baselines evaluated beside the rules: the equal-FLOP monoliths (ddm.train.budget) and a student.
SINGLE_MODELS = ("monolith", "monolith-small-batch", "distilled")


def single_model_dir(rule: str, ensemble_description: dict) -> str:
    """Run dir of a one-model baseline: a monolith, or the student distilled from this ensemble."""
    if rule == "distilled":
        return layout.distilled_dir(layout.ensemble_id(ensemble_description))
    return layout.SMALL_BATCH_MONOLITH_DIR if rule == "monolith-small-batch" else layout.MONOLITH_DIR


def router_accuracy(
    router,
    flow: FlowMatching,
    x: torch.Tensor,
    y: torch.Tensor | None,
    partitions: torch.Tensor,
    ts: list[float],
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Accuracy of argmax p(k | x_t, t, y) against the true partition at each t (the router runs
    on ``device``; the noise comes from a CPU stream, the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for t_val in ts:
            t = torch.full((1,), float(t_val)).expand(len(x))  # one shared time (TimestepEmbedder)
            x_t = flow.interpolate(x, torch.randn(x.shape, generator=g), t)
            pred = []
            for i in range(0, len(x), 500):
                rows = slice(i, i + 500)
                y_rows = None if y is None else y[rows].to(device)
                pred.append(router(x_t[rows].to(device), t[rows].to(device), y_rows).argmax(1).cpu())
            out.append(float((torch.cat(pred) == partitions).float().mean()))
    return out


def _plot_router_accuracy(ts: list[float], acc: list[float], k: int, prior_max: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ts, acc, "o-", label="router argmax")
    ax.axhline(prior_max, color="gray", ls="--", lw=1, label=f"largest partition share ({prior_max:.2f})")
    ax.set(
        xlabel="t (0 = data, 1 = noise)",
        ylabel="accuracy",
        title=f"router accuracy vs noise level (K={k})",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


class Judge:
    """What every model of one evaluation is measured against, so that all see the same: the data's
    features under the metric (and the data floor: two halves of the data), one draw of (label,
    partition) pairs from the data, and the initial noise of ``ddm.ensemble.sample``'s streams. ``ddm.eval.curves``
    measures the models of every learning-curve point with the judge of the final evaluation."""

    def __init__(self, store: Store, cfg: EvalConfig, desc: dict, device: torch.device):
        self.cfg, self.flow, self.data_shape = cfg, FlowMatching(**desc["flow"]), tuple(desc["data_shape"])
        self.device = device
        self.num_classes, k = int(desc["num_classes"]), int(desc["num_experts"])
        # Reference data: the whole dataset (its labels and partitions also drive the samples' labels).
        data = PartitionReader(  # the images, labels, partitions and captions (not their stored embeddings)
            store, None, batch_size=int(sum(store.manifest(layout.PARTITIONS_DIR)["counts"])), embeddings=False
        ).next_batch()
        self.x_data, self.y_data, self.p_data = data["x"], data["y"], data["partition"]
        has_labels = store.manifest(layout.DATA_DIR)["num_classes"] > 1
        if cfg.metric == "fid":
            self.embedder, self.feature_info = InceptionFeatures(device), {"network": "inception-v3 (pytorch-fid)"}
        else:
            targets, n_targets, target_name = (
                (self.y_data, self.num_classes or int(self.y_data.max()) + 1, "labels")
                if has_labels
                else (self.p_data, k, "partitions")
            )
            self.embedder, self.feature_info = load_or_train_classifier(
                store, self.x_data, targets.long(), n_targets, target_name
            )
        ref_features = self.embedder.embed(self.x_data)
        self.mu, self.sigma = gaussian_stats(ref_features)
        half = len(self.x_data) // 2
        self.floor = frechet_distance(*gaussian_stats(ref_features[:half]), *gaussian_stats(ref_features[half:]))
        # One draw of (label, partition) pairs from the data for every model: the oracle needs
        # partitions consistent with the labels, and every rule must sample the same conditional.
        pick = torch.randint(len(self.x_data), (cfg.num_samples,), generator=stream(cfg.seed, LABELS))
        self.labels = self.y_data[pick].to(device) if self.num_classes else None
        self.parts = self.p_data[pick].to(device)
        # A text ensemble samples the captions of the same draw (the prompts) or held-out ones, and
        # its prompt adherence is measured on them (``ddm.eval.adherence``).
        self.text, self.prompts = desc.get("text"), None
        if self.text:
            if "caption" not in data:
                raise ValueError(f"the ensemble is text-conditioned but the dataset in {store.url} has no captions")
            self.encoder = ensemble_encoder(store, desc, device)  # checked against what each export recorded
            self.captions = data["caption"]
            if cfg.held_out:  # prompts (and their classes) from data no model trained on
                manifest = store.manifest(layout.DATA_DIR)
                prompts, labels = held_out_prompts(manifest, cfg.held_out, cfg.held_out_seed, cfg.num_samples)
                classes, source = torch.tensor(labels), f"held out: {cfg.held_out} (seed {cfg.held_out_seed})"
                self.parts = None  # no partitions: the oracle rule is refused (EvalConfig)
            else:
                prompts, classes = [self.captions[int(i)] for i in pick], self.y_data[pick]
                source = "the captions of the data images drawn for the samples (the labels' draw)"
            classifier = isinstance(self.embedder, torch.nn.Module)
            self.prompts = PromptSet(prompts, classes if has_labels and classifier else None, self.encode,
                                     self.embedder, self.x_data, self.captions, cfg.seed, source)  # fmt: skip
            self.labels = self.prompts.embeddings
        self.cfg_branches = 2 if cfg.guidance != 1.0 and self.labels is not None else 1  # CFG: cond + uncond

    def encode(self, captions: list[str]):
        """The captions' embeddings in host memory (the samples' rows go to the device batch by batch)."""
        return self.encoder.encode_to_cpu(captions)

    def labels_of(self, rows: slice):
        """The conditioning of samples ``rows`` on the device: their classes or their prompts' embeddings."""
        return None if self.labels is None else self.labels[rows].to(self.device)

    def adherence(self, x: torch.Tensor) -> dict | None:
        """Prompt adherence of samples ``x`` (``ddm.eval.adherence``); None for a class-conditional model."""
        return None if self.prompts is None else self.prompts.adherence(x)

    def prompt_info(self) -> dict:
        return self.prompts.info()

    def single_model(self, model) -> Callable[[slice], VelocityFn]:
        return lambda rows: guided(model, self.labels_of(rows), self.cfg.guidance)

    def ensemble(self, ens) -> Callable[[slice], VelocityFn]:
        """Velocities of ``ens`` under its current rule (the sample rule's draws from their own stream)."""
        rule_draws = stream(self.cfg.seed, RULE_DRAWS)

        def velocity(rows: slice) -> VelocityFn:
            y = self.labels_of(rows)
            parts = None if self.parts is None else self.parts[rows]
            return ens.velocity_fn(y=y, partition=parts, guidance_scale=self.cfg.guidance, generator=rule_draws)

        return velocity

    def measure(self, velocity: Callable[[slice], VelocityFn]) -> tuple[float, torch.Tensor]:
        """(distance to the data, the samples) of the model behind ``velocity``."""
        x = draw(self.flow, velocity, self.cfg, self.data_shape)
        return frechet_distance(*gaussian_stats(self.embedder.embed(x)), self.mu, self.sigma), x


def evaluate(store: Store, cfg: EvalConfig) -> dict:
    """Sample under each rule with one set of labels, measure the distance to the data; see module doc."""
    cfg = cfg.seeded()
    device = resolve_device(cfg.device)
    ens = load_ensemble(store, device=device)
    desc = ens.description
    rules = list(cfg.rules)
    for rule in rules:
        if rule in SINGLE_MODELS and not store.is_committed(f"{single_model_dir(rule, desc)}/{layout.EXPORT}"):
            how = "run `ddm distill` on this ensemble" if rule == "distilled" else "train it (ddm run monolith=true)"
            raise ValueError(
                f"rule {rule!r} needs a committed export in {store.url}/{single_model_dir(rule, desc)} ({how}), or "
                "drop it from rules"
            )
    # What the results depend on: the settings, the ensemble, and the exact one-model baselines.
    models = {
        r: store.child(single_model_dir(r, desc)).manifest(layout.EXPORT)["files"][layout.EXPORT_WEIGHTS]["sha256"]
        for r in rules
        if r in SINGLE_MODELS
    }
    measures = {"adherence": ADHERENCE_VERSION} if desc.get("text") else {}  # a new measure: measured again
    settings = {"config": asdict(cfg), "ensemble": desc, "models": models, "streams": STREAMS, **measures}
    digest = layout.short_digest({"config": settings["config"], "models": models, "streams": STREAMS, **measures})
    name = cfg.name or f"s{cfg.seed}-{layout.ensemble_id(desc)}-{digest}"
    out = store.child(layout.eval_dir(name))
    if out.exists("results.json"):
        old = out.read_json("results.json")
        if {k: old.get(k) for k in settings} != settings:
            raise ValueError(
                f"{out.url} holds an evaluation made with other settings (or another ensemble or models); choose "
                "another name="
            )
        log.info("evaluation already in %s", out.url)
        return old
    t0 = time.perf_counter()
    judge = Judge(store, cfg, desc, device)
    flops = forward_flops_of(store, desc)
    results = []  # in the order asked for
    grids = {}
    for rule in progress(rules, desc="evaluate", unit="rule"):
        start = time.perf_counter()
        if rule in SINGLE_MODELS:
            run_dir = single_model_dir(rule, desc)
            model_cfg, manifest = read_export(store, run_dir)
            if judge.text:  # a monolith or student reads the prompts with the encoder it was trained with
                check_encoder(model_cfg.get("text_encoder"), judge.encoder, f"{store.url}/{run_dir}/{layout.EXPORT}")
            # In the ensemble's velocity, whatever the model predicts (a DDPM monolith is converted).
            entry = {"dir": run_dir, "sha256": weights_sha256(manifest), "flow": model_cfg["flow"]}
            model = LazyModel(store, entry, device=device, flow=desc["flow"])
            model_flops = export_forward_flops(model_cfg)
            fd, x = judge.measure(judge.single_model(model))
            cost = single_model_sampling_cost(model_flops, cfg.evals_per_sample, judge.cfg_branches)
            key = rule
        else:
            ens.rule = Rule.parse(rule)
            ens.reset_stats()
            fd, x = judge.measure(judge.ensemble(ens))
            st = ens.stats  # counted by the ensemble (CFG branches included)
            cost = ensemble_sampling_cost(
                flops["experts"], flops["router"], st.expert_evals, st.router_evals, st.velocity_evals,
                cfg.evals_per_sample,
            )  # fmt: skip
            key = str(ens.rule)
        seconds = time.perf_counter() - start
        results.append({"rule": key, "distance": fd, **cost, "seconds": seconds})
        adherence = judge.adherence(x)
        if adherence is not None:
            results[-1]["prompt_retrieval"] = adherence["retrieval"]
            if adherence["accuracy"] is not None:
                results[-1]["prompt_adherence"] = adherence["accuracy"]
        if x.shape[1] in (1, 3):
            grids[key] = image_grid(x[:64].numpy())
        log.info(
            "%s: %s %.3f, %.1f expert + %.1f router forwards, %.3g FLOPs per sample (%.0f s)",
            key, cfg.metric, fd, cost["expert_forwards_per_sample"], cost["router_forwards_per_sample"],
            cost["sampling_flops_per_sample"], seconds,
        )  # fmt: skip

    flow, k, num_classes = judge.flow, ens.num_experts, judge.num_classes
    x_data, y_data, p_data = judge.x_data, judge.y_data, judge.p_data
    baselines = {r: single_model_dir(r, desc) for r in rules if r in SINGLE_MODELS}
    y_ref = y_data if num_classes else None
    sub = torch.randperm(len(x_data), generator=stream(cfg.seed, LABELS, 1))[: cfg.router_samples]
    y_sub = None if y_ref is None else y_ref[sub]
    if judge.text:  # the router reads the captions of its samples (an image-only one ignores them)
        y_sub = judge.encode([judge.captions[int(i)] for i in sub])
    acc = router_accuracy(ens.router, flow, x_data[sub], y_sub, p_data[sub], cfg.router_t, cfg.seed, device)
    prior_max = float(torch.bincount(p_data, minlength=k).max()) / len(p_data)
    report = {
        **settings,
        "dir": layout.eval_dir(name),
        "metric": cfg.metric,
        "metric_label": metric_label(cfg.metric),
        "feature_network": judge.feature_info,
        "data_floor": judge.floor,
        "reference_samples": len(x_data),
        "rules": results,
        "forward_flops": flops,
        "training_flops": training_flops(store, desc, baselines),
        "arms": training_arms(store, desc, baselines),
        "router_accuracy": {"t": list(cfg.router_t), "accuracy": acc, "largest_partition_share": prior_max},
        **({"prompts": judge.prompt_info()} if judge.text else {}),
        "seconds": time.perf_counter() - t0,
    }
    for key, png in grids.items():
        out.write_bytes(f"{key.replace(':', '_')}.png", png)
    out.write_bytes("router_accuracy.png", _plot_router_accuracy(list(cfg.router_t), acc, k, prior_max))
    out.write_bytes("report.md", format_report(report).encode())
    out.write_json("results.json", report)  # last: marks the evaluation complete
    return report


def format_report(r: dict) -> str:
    """A markdown table of the per-rule results, with what each rule costs to sample and what each
    arm cost to train."""
    lines = [
        f"Metric: {r['metric_label']}; lower is better. Data floor (two halves of the data): {r['data_floor']:.3f}.",
        "",
        "| rule | distance | expert forwards / sample | router forwards / sample | sampling MFLOPs / sample "
        "| router share | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in r["rules"]:
        flops = v.get("sampling_flops_per_sample")  # evaluations made before ddm counted FLOPs lack them
        cost = ["", "", ""] if flops is None else [
            f"{v['router_forwards_per_sample']:.0f}", f"{flops / 1e6:,.1f}", f"{100 * v['router_share']:.1f}%"
        ]  # fmt: skip
        lines.append(
            f"| {v['rule']} | {v['distance']:.3f} | {v['expert_forwards_per_sample']:.0f} | {' | '.join(cost)} | "
            f"{v['seconds']:.1f} |"
        )
    f = r.get("forward_flops")
    if f:
        lines += [
            "",
            f"One forward: expert {sum(f['experts']) / len(f['experts']) / 1e6:.2f} MFLOPs, router "
            f"{f['router'] / 1e6:.3f} MFLOPs ({100 * f['router_over_expert']:.1f}% of an expert; the paper's is ~4%).",
        ]
    tf = r.get("training_flops")
    if tf and tf["ensemble"]["total"]:
        ens = tf["ensemble"]
        text = (
            f"Training FLOPs: ensemble {ens['total']:.3g} ({len(ens['experts'])} experts "
            f"{sum(ens['experts']):.3g} + router {ens['router']:.3g})"
        )
        for name, v in tf.items():
            if name != "ensemble" and v["total"]:
                text += f"; {name} {v['total']:.3g} ({v['ratio_to_ensemble']:.3f}x the ensemble's)"
        lines += ["", text + "."]
    adherent = [v for v in r["rules"] if "prompt_adherence" in v]
    if adherent:
        chance = r["prompts"]["adherence_chance"]
        lines += ["", f"Prompt adherence (classifier accuracy on the prompts' classes; chance {chance:.3f}): "
                  + ", ".join(f"{v['rule']} {v['prompt_adherence']:.3f}" for v in adherent) + "."]  # fmt: skip
    retrieved = [v for v in r["rules"] if "prompt_retrieval" in v]
    if retrieved:
        p = r["prompts"]
        lines += ["", f"Prompt retrieval (a sample's own prompt found among {round(1 / p['retrieval_chance'])} from "
                  f"its image features; chance {p['retrieval_chance']:.3f}, data images {p['retrieval_data']:.3f}): "
                  + ", ".join(f"{v['rule']} {v['prompt_retrieval']:.3f}" for v in retrieved) + "."]  # fmt: skip
    ra = r["router_accuracy"]
    lines += [
        "",
        "Router accuracy (argmax vs partition) by t: "
        + ", ".join(f"t={t:g}: {a:.2f}" for t, a in zip(ra["t"], ra["accuracy"])),
        "",
    ]
    return "\n".join(lines)
