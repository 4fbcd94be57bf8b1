"""Distances between sample sets, and ``ddm evaluate``: the ensemble's quality under each rule.

Metrics
-------
- ``energy_distance``: for low-dimensional data (the mixture demo).
- ``frechet_distance``: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between the Gaussians
  fitted to two feature sets. On features of a small CNN that ``ddm evaluate`` trains on the
  dataset itself it is reported as **FD-classifier** (works offline, on any dataset, comparable
  only within one dataset); on Inception-v3 pool features it is **FID** (``metric=fid``, needs the
  pinned ``pytorch-fid`` and its weights, which are downloaded on first use).

``evaluate(store, cfg)`` samples the store's ensemble under each rule (and the monolith when the
store has one) with the same labels, and writes ``eval/<name>/``: ``results.json`` (per rule: the
distance, expert forwards per sample, seconds), ``router_accuracy.png`` (accuracy of the router's
argmax against each sample's partition as a function of t), ``<rule>.png`` sample grids and a
``report.md``. A name that holds results of other settings is an error: two configs never mix.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

log = logging.getLogger("ddm.evaluate")

FID_REQUIREMENT = "pytorch-fid==0.3.0"  # the one FID implementation ddm uses (pinned: FIDs differ across libraries)


# --- distances ------------------------------------------------------------------------------


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two sample sets (N, D), (M, D).

    Zero iff the distributions are equal; the within-set terms exclude the diagonal (unbiased
    U-statistics), so two independent sample sets of one distribution give values near 0.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance needs (N, D) and (M, D) sets with one D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("energy_distance needs at least 2 samples per set")
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N, D) array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, s1) and N(mu2, s2).

    Tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum), which is stable for singular covariances,
    unlike a general matrix square root.
    """
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched Gaussian statistics: means {mu1.shape}/{mu2.shape}, covariances {s1.shape}/{s2.shape}")
    r1 = _psd_sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


# --- the feature network of FD-classifier -----------------------------------------------------


class FeatureClassifier(nn.Module):
    """A small CNN for (C, H, W) images; its 128-d pooled features define FD-classifier."""

    feature_dim = 128

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GroupNorm(8, 64), nn.SiLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.GroupNorm(8, 128), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
        self.eval()
        return torch.cat([self.features(x[i : i + batch_size].float()) for i in range(0, len(x), batch_size)]).numpy()


CLASSIFIER_DIR = "eval/classifier"


def train_classifier(x: torch.Tensor, targets: torch.Tensor, num_classes: int, steps: int = 600, seed: int = 0) -> tuple[FeatureClassifier, float]:
    """Train on 90% of (x, targets); returns the model and its accuracy on the other 10%."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = max(1, len(x) // 10)
    val, tr = perm[:n_val], perm[n_val:]
    model = FeatureClassifier(x.shape[1], num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = tr[torch.randint(len(tr), (128,), generator=g)]
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # light noise: features robust to sampler grain
        loss = nn.functional.cross_entropy(model(xb), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[val]).argmax(1) == targets[val]).float().mean().item()
    return model, acc


def load_or_train_classifier(store, x: torch.Tensor, targets: torch.Tensor, num_classes: int, target_name: str) -> tuple[FeatureClassifier, dict]:
    """The store's feature classifier (trained once per dataset and kept under eval/classifier/)."""
    from safetensors.torch import load, save

    data_committed_at = store.manifest("data").get("committed_at")
    if store.is_committed(CLASSIFIER_DIR):
        info = json.loads(store.read_verified(CLASSIFIER_DIR, "config.json"))
        if (info["target"], info["num_classes"], info["in_channels"], info["data"]) == (target_name, num_classes, x.shape[1], data_committed_at):
            model = FeatureClassifier(info["in_channels"], num_classes)
            model.load_state_dict(load(store.read_verified(CLASSIFIER_DIR, "model.safetensors")))
            return model.eval(), info
        raise ValueError(
            f"{store.url}/{CLASSIFIER_DIR} holds a feature classifier for other data or targets ({info['target']}, "
            f"{info['num_classes']} classes); this evaluation needs one for {target_name} ({num_classes} classes) on "
            "the current dataset; delete that folder to retrain it (distances from the two networks are not comparable)"
        )
    log.info("training the FD-classifier feature network on %d samples (%s, %d classes)", len(x), target_name, num_classes)
    model, acc = train_classifier(x, targets, num_classes)
    info = {"target": target_name, "num_classes": num_classes, "in_channels": int(x.shape[1]), "val_accuracy": acc, "data": data_committed_at}
    known = {
        "model.safetensors": store.write_hashed(f"{CLASSIFIER_DIR}/model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()})),
        "config.json": store.write_hashed(f"{CLASSIFIER_DIR}/config.json", json.dumps(info, indent=2).encode()),
    }
    store.commit(CLASSIFIER_DIR, list(known), known=known)
    return model, info


# --- FID (optional, pinned library) ---------------------------------------------------------


class InceptionFeatures:
    """Inception-v3 pool3 features from ``pytorch-fid`` (the pinned FID implementation)."""

    def __init__(self) -> None:
        try:
            from pytorch_fid.inception import InceptionV3
        except ImportError as e:
            raise ValueError(
                f"metric=fid needs {FID_REQUIREMENT}: pip install 'ddm[fid]' (or use metric=fd_classifier, which works offline)"
            ) from e
        try:
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        except Exception as e:  # urllib / socket errors when the weights cannot be downloaded
            raise ValueError(
                "FID needs the Inception-v3 FID weights (pt_inception-2015-12-05-6726825d.pth), which pytorch-fid "
                f"downloads on first use, and they could not be fetched ({type(e).__name__}: {e}). Put the file in "
                "$TORCH_HOME/hub/checkpoints/ on an offline machine, or use metric=fd_classifier"
            ) from e

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 100) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch_size):
            xb = (x[i : i + batch_size].float().clamp(-1, 1) + 1) / 2  # pytorch-fid wants [0, 1]
            if xb.shape[1] == 1:
                xb = xb.repeat(1, 3, 1, 1)
            out.append(self.model(xb)[0].flatten(1))
        return torch.cat(out).numpy()


# --- ddm evaluate -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    rules: list[str] = field(default_factory=lambda: ["monolith", "top1", "top2", "full", "oracle"])
    num_samples: int = 1000
    steps: int = 30
    sampler: str = "heun"
    guidance: float = 1.0
    seed: int = 0
    batch_size: int = 500
    metric: str = "fd_classifier"  # fd_classifier (offline) | fid (Inception, pytorch-fid)
    router_t: list[float] = field(default_factory=lambda: [round(0.05 + 0.1 * i, 2) for i in range(10)])
    name: str = ""  # output folder under eval/; empty: s<seed>-<ensemble id>-<settings digest>

    def __post_init__(self) -> None:
        from ddm.flow import SAMPLERS

        for f in ("num_samples", "steps", "batch_size"):
            if getattr(self, f) < 2:
                raise ValueError(f"{f} must be >= 2, got {getattr(self, f)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {list(SAMPLERS)}")
        if self.metric not in ("fd_classifier", "fid"):
            raise ValueError(f"metric must be fd_classifier or fid, got {self.metric!r}")
        if not self.rules:
            raise ValueError("rules is empty; list at least one of monolith, top1, top2, full, oracle, sample, ...")
        if any(not 0.0 <= t <= 1.0 for t in self.router_t):
            raise ValueError(f"router_t values must lie in [0, 1], got {self.router_t}")


def metric_label(metric: str) -> str:
    return "FID (Inception-v3, pytorch-fid)" if metric == "fid" else "FD-classifier (Fréchet distance on a CNN trained on this dataset)"


SINGLE_MODELS = ("monolith", "distilled")  # one-model baselines evaluated beside the rules


def single_model_dir(rule: str, ensemble_description: dict) -> str:
    """Run dir of a one-model baseline: the monolith, or the student distilled from this ensemble."""
    from ddm.ensemble import ensemble_id

    return "monolith" if rule == "monolith" else f"distilled/{ensemble_id(ensemble_description)}"


def single_model(store, run_dir: str):
    """A one-model baseline (the monolith, the distilled student) from its verified export."""
    from ddm.ensemble import LazyModel, model_config_from_export
    from ddm.models import build_model

    manifest = store.child(run_dir).verify("export")
    entry = {"dir": run_dir, "sha256": manifest["files"]["model.safetensors"]["sha256"]}
    return LazyModel(store, entry, lambda cfg: build_model(model_config_from_export(cfg))).load()


def router_accuracy(router, flow, x: torch.Tensor, y: torch.Tensor | None, partitions: torch.Tensor, ts: list[float], seed: int = 0) -> list[float]:
    """Accuracy of argmax p(k | x_t, t, y) against the true partition at each t."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for t_val in ts:
            t = torch.full((len(x),), float(t_val))
            x_t = flow.interpolate(x, torch.randn(x.shape, generator=g), t)
            pred = torch.cat([router(x_t[i : i + 500], t[i : i + 500], None if y is None else y[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
            out.append(float((pred == partitions).float().mean()))
    return out


def _plot_router_accuracy(ts: list[float], acc: list[float], k: int, prior_max: float) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ts, acc, "o-", label="router argmax")
    ax.axhline(prior_max, color="gray", ls="--", lw=1, label=f"largest partition share ({prior_max:.2f})")
    ax.set(xlabel="t (0 = data, 1 = noise)", ylabel="accuracy", title=f"router accuracy vs noise level (K={k})", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def evaluate(store, cfg: EvalConfig) -> dict:
    """Sample under each rule with one set of labels, measure the distance to the data; see module doc."""
    from tqdm.auto import tqdm

    from ddm.data.reader import PartitionReader
    from ddm.ensemble import Rule, ensemble_id, load_ensemble, short_digest
    from ddm.flow import FlowMatching, guided
    from ddm.sample import image_grid

    ens = load_ensemble(store)
    desc = ens.description
    rules = list(cfg.rules)
    for rule in rules:
        if rule in SINGLE_MODELS and not store.is_committed(f"{single_model_dir(rule, desc)}/export"):
            how = "train one with partition=-1" if rule == "monolith" else "run `ddm distill` on this ensemble"
            raise ValueError(f"rule {rule!r} needs a committed export in {store.url}/{single_model_dir(rule, desc)} ({how}), or drop it from rules")
    # What the results depend on: the settings, the ensemble, and the exact one-model baselines.
    models = {r: store.child(single_model_dir(r, desc)).manifest("export")["files"]["model.safetensors"]["sha256"] for r in rules if r in SINGLE_MODELS}
    settings = {"config": asdict(cfg), "ensemble": desc, "models": models}
    name = cfg.name or f"s{cfg.seed}-{ensemble_id(desc)}-{short_digest({'config': settings['config'], 'models': models})}"
    out = store.child(f"eval/{name}")
    if out.exists("results.json"):
        old = out.read_json("results.json")
        if {k: old.get(k) for k in settings} != settings:
            raise ValueError(f"{out.url} holds an evaluation made with other settings (or another ensemble or models); choose another name=")
        log.info("evaluation already in %s", out.url)
        return old
    flow = FlowMatching(**desc["flow"])
    num_classes = int(desc["num_classes"])
    t0 = time.perf_counter()

    # Reference data: the whole dataset (its labels and partitions also drive the samples' labels).
    data = PartitionReader(store, None, batch_size=int(sum(store.manifest("partitions")["counts"]))).next_batch()
    x_data, y_data, p_data = data["x"], data["y"], data["partition"]
    k = ens.num_experts
    if cfg.metric == "fid":
        embedder = InceptionFeatures()
        feature_info = {"network": "inception-v3 (pytorch-fid)"}
    else:
        has_labels = store.manifest("data")["num_classes"] > 0
        targets, n_targets, target_name = (y_data, num_classes or int(y_data.max()) + 1, "labels") if has_labels else (p_data, k, "partitions")
        embedder, feature_info = load_or_train_classifier(store, x_data, targets.long(), n_targets, target_name)
    ref_features = embedder.embed(x_data)
    mu_ref, s_ref = gaussian_stats(ref_features)
    half = len(x_data) // 2
    floor = frechet_distance(*gaussian_stats(ref_features[:half]), *gaussian_stats(ref_features[half:]))

    # One draw of (label, partition) pairs from the data for every rule: the oracle needs partitions
    # consistent with the labels, and every rule must sample the same conditional distribution.
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randint(len(x_data), (cfg.num_samples,), generator=g)
    labels = y_data[pick] if num_classes else None
    parts = p_data[pick]
    evals_per_sample = cfg.steps * (2 if cfg.sampler == "heun" else 1)
    results = []  # in the order asked for
    grids = {}
    cfg_branches = 2 if cfg.guidance != 1.0 and labels is not None else 1  # CFG: conditional + unconditional
    for rule in tqdm(rules, desc="evaluate", unit="rule"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same initial noise for every rule
        start = time.perf_counter()
        if rule in SINGLE_MODELS:
            model = single_model(store, single_model_dir(rule, desc))
            velocity = lambda y, p: guided(model, y, cfg.guidance)  # noqa: E731
        else:
            ens.rule = Rule.parse(rule)
            ens.reset_stats()
            velocity = lambda y, p: ens.velocity_fn(y=y, partition=p, guidance_scale=cfg.guidance, generator=gen)  # noqa: E731
        chunks = []
        for i in range(0, cfg.num_samples, cfg.batch_size):
            noise = torch.randn(min(cfg.batch_size, cfg.num_samples - i), *desc["data_shape"], generator=gen)
            rows = slice(i, i + len(noise))
            with torch.no_grad():
                chunks.append(flow.sample(velocity(None if labels is None else labels[rows], parts[rows]), noise, cfg.steps, cfg.sampler))
        if rule in SINGLE_MODELS:
            forwards = float(evals_per_sample * cfg_branches)
        else:  # counted by the ensemble (CFG branches included)
            forwards = ens.stats.expert_forwards_per_eval * evals_per_sample
        x = torch.cat(chunks)
        seconds = time.perf_counter() - start
        fd = frechet_distance(*gaussian_stats(embedder.embed(x)), mu_ref, s_ref)
        key = rule if rule in SINGLE_MODELS else str(ens.rule)
        results.append({"rule": key, "distance": fd, "expert_forwards_per_sample": forwards, "seconds": seconds})
        if x.shape[1] in (1, 3):
            grids[key] = image_grid(x[:64].numpy())
        log.info("%s: %s %.3f, %.1f expert forwards per sample (%.0f s)", key, cfg.metric, fd, forwards, seconds)

    acc = router_accuracy(ens.router, flow, x_data, y_data if num_classes else None, p_data, cfg.router_t, cfg.seed)
    prior_max = float(torch.bincount(p_data, minlength=k).max()) / len(p_data)
    report = {
        **settings,
        "dir": f"eval/{name}",
        "metric": cfg.metric,
        "metric_label": metric_label(cfg.metric),
        "feature_network": feature_info,
        "data_floor": floor,
        "reference_samples": len(x_data),
        "rules": results,
        "router_accuracy": {"t": list(cfg.router_t), "accuracy": acc, "largest_partition_share": prior_max},
        "seconds": time.perf_counter() - t0,
    }
    for key, png in grids.items():
        out.write_bytes(f"{key.replace(':', '_')}.png", png)
    out.write_bytes("router_accuracy.png", _plot_router_accuracy(list(cfg.router_t), acc, k, prior_max))
    out.write_bytes("report.md", format_report(report).encode())
    out.write_json("results.json", report)  # last: marks the evaluation complete
    return report


def format_report(r: dict) -> str:
    """A markdown table of the per-rule results."""
    lines = [
        f"Metric: {r['metric_label']}; lower is better. Data floor (two halves of the data): {r['data_floor']:.3f}.",
        "",
        "| rule | distance | expert forwards / sample | seconds |",
        "|---|---:|---:|---:|",
    ]
    for v in r["rules"]:
        lines.append(f"| {v['rule']} | {v['distance']:.3f} | {v['expert_forwards_per_sample']:.0f} | {v['seconds']:.1f} |")
    ra = r["router_accuracy"]
    lines += ["", "Router accuracy (argmax vs partition) by t: " + ", ".join(f"t={t:g}: {a:.2f}" for t, a in zip(ra["t"], ra["accuracy"])), ""]
    return "\n".join(lines)
