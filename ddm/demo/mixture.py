"""The mixture demo: the whole DDM method, end to end, on a 2-D Gaussian mixture in a minute.

1. sample a ring of Gaussians; 2. partition it with k-means into K clusters; 3. train one small
MLP expert per cluster, each in isolation; 4. train a router on noised samples of all the data
to predict the cluster; 5. sample with the ensemble under several rules; 6. compare with one
monolithic model trained on all the data with the same total training FLOPs (router included).
It writes ``output_dir/samples.png`` (data vs samples per rule) and ``results.json`` (energy
distances to held-out data: lower is better; compare with the data floor, the distance between two
data sets of the same size).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from torch import nn

from ddm.core.config import to_dict
from ddm.core.logs import progress
from ddm.demo.config import DemoConfig
from ddm.ensemble.analytic import GaussianMixture
from ddm.ensemble.combine import Ensemble, Rule
from ddm.eval.metrics import energy_distance
from ddm.models.build import build_model, build_router
from ddm.models.flow import FlowMatching
from ddm.train.ema import EMA
from ddm.train.objectives import RouterLoss, VelocityLoss

log = logging.getLogger("ddm.demo.mixture")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fit_velocity(
    model: nn.Module, data: torch.Tensor, flow: FlowMatching, cfg: DemoConfig, steps: int, seed: int, desc: str
) -> nn.Module:
    """Train a velocity model on ``data`` with Adam; returns its EMA copy."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema_decay)
    objective = VelocityLoss(flow)
    model.train()
    for _ in progress(range(steps), desc=desc, leave=False, mininterval=1.0):
        batch = data[torch.randint(len(data), (cfg.batch_size,), generator=g)]
        loss = objective(model, {"x": batch, "y": None}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
    return ema.apply_to(model)


def fit_router(
    router: nn.Module, data: torch.Tensor, labels: torch.Tensor, flow: FlowMatching, cfg: DemoConfig, seed: int
) -> tuple[nn.Module, float]:
    """Cross-entropy on (x_t, t) -> partition for noised samples of all the data."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
    ema = EMA(router, cfg.ema_decay)
    objective = RouterLoss(flow)
    router.train()
    for _ in progress(range(cfg.router_steps), desc="router", leave=False, mininterval=1.0):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=g)
        loss = objective(router, {"x": data[idx], "y": None, "partition": labels[idx]}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(router)
    return ema.apply_to(router), loss.item()


def partition(data: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k-means cluster index of every sample (the data tier replaces this with two-stage k-means)."""
    from sklearn.cluster import KMeans  # scikit-learn takes 1.5 s to import: only where k-means runs

    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(data.numpy())
    return torch.from_numpy(km.labels_).long()


def run_demo(cfg: DemoConfig, plot: bool = True) -> dict:
    """Run the demo; returns the results dict that is also written to ``output_dir/results.json``."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # Small MLPs: one thread per process is faster than two fighting over tiny matmuls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(cfg, plot, t0)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg: DemoConfig, plot: bool, t0: float) -> dict:
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(cfg.seed)
    d = cfg.data
    gm = GaussianMixture.ring(d.num_components, d.dim, d.radius, d.std)
    train, _ = gm.sample(d.num_train, g)
    held_out, _ = gm.sample(d.num_eval, g)
    held_out_2, _ = gm.sample(d.num_eval, g)
    train, held_out, held_out_2 = train.float(), held_out.float(), held_out_2.float()
    flow, k = FlowMatching.of(cfg.flow), cfg.num_partitions

    log.info("partitioning %d samples into %d clusters with k-means", len(train), k)
    labels = partition(train, k, cfg.seed)
    counts = torch.bincount(labels, minlength=k)
    if (counts == 0).any():
        raise ValueError(
            f"k-means left partitions {torch.nonzero(counts == 0).flatten().tolist()} empty; lower num_partitions"
        )

    experts = []
    for i in range(k):
        log.info(
            "expert %d/%d: %d samples, %d steps (isolated: own model, optimizer and RNG)",
            i + 1,
            k,
            counts[i],
            cfg.steps_per_expert,
        )
        torch.manual_seed(cfg.seed + 1 + i)
        experts.append(
            fit_velocity(
                build_model(cfg.expert),
                train[labels == i],
                flow,
                cfg,
                cfg.steps_per_expert,
                cfg.seed + 1 + i,
                f"expert {i}",
            )
        )

    log.info("router: %d steps on noised samples of all data", cfg.router_steps)
    torch.manual_seed(cfg.seed + 1000)
    router, router_loss = fit_router(build_router(cfg.router, k), train, labels, flow, cfg, cfg.seed + 1000)

    # Same total training FLOPs: training cost per step is proportional to parameters x batch,
    # so the monolith gets the experts' steps plus the router's steps in expert-sized units.
    expert_params, router_params = num_params(experts[0]), num_params(router)
    monolith_steps = k * cfg.steps_per_expert + round(cfg.router_steps * router_params / expert_params)
    log.info("monolith: one model on all data for %d steps (same training FLOPs as the ensemble)", monolith_steps)
    torch.manual_seed(cfg.seed + 2000)
    monolith = fit_velocity(build_model(cfg.expert), train, flow, cfg, monolith_steps, cfg.seed + 2000, "monolith")

    noise = torch.randn(cfg.num_samples, d.dim, generator=g)
    samples: dict[str, torch.Tensor] = {}
    results: dict = {"rules": {}}
    with torch.no_grad():
        samples["monolith"] = flow.sample(lambda x, t: monolith(x, t), noise, cfg.sample_steps, cfg.sampler)
        evals = cfg.sample_steps * (2 if cfg.sampler == "heun" else 1)
        results["monolith"] = {
            "energy_distance": energy_distance(samples["monolith"], held_out),
            "expert_forwards_per_sample": evals,
        }
        # The oracle samples a partition with its data frequency, then runs only that expert:
        # an exact sampler of the mixture of partitions if every expert were perfect.
        oracle_part = torch.multinomial(counts.float(), cfg.num_samples, replacement=True, generator=g)
        for text in cfg.rules:
            rule = Rule.parse(text)
            ens = Ensemble(experts, router, rule)
            part = oracle_part if rule.name == "oracle" else None
            x = flow.sample(ens.velocity_fn(partition=part, generator=g), noise, cfg.sample_steps, cfg.sampler)
            samples[str(rule)] = x
            results["rules"][str(rule)] = {
                "energy_distance": energy_distance(x, held_out),
                "expert_forwards_per_sample": ens.stats.expert_forwards_per_eval * evals,
                "router_forwards_per_sample": ens.stats.router_forwards_per_eval * evals,
            }
    results.update(
        data_floor=energy_distance(held_out_2, held_out),  # two data sets of the same size: the noise floor
        noise_baseline=energy_distance(noise, held_out),  # the untrained starting point
        partition_counts=counts.tolist(),
        steps_per_expert=cfg.steps_per_expert,
        router_steps=cfg.router_steps,
        router_final_loss=router_loss,
        monolith_steps=monolith_steps,
        expert_params=expert_params,
        router_params=router_params,
        seconds=time.perf_counter() - t0,
        config=to_dict(cfg),
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        results["figure"] = str(plot_samples(train, labels, samples, results, out_dir / "samples.png"))
    return results


def plot_samples(
    train: torch.Tensor, labels: torch.Tensor, samples: dict[str, torch.Tensor], results: dict, path: Path
) -> Path:
    """One panel for the partitioned data, then one per sampler, titled with its energy distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(samples) + 1
    cols = min(panels, 4)
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    lim = float(train[:, :2].abs().max()) * 1.15
    show = train[:4000]
    axes[0, 0].scatter(show[:, 0], show[:, 1], s=2, c=labels[:4000], cmap="tab10")
    axes[0, 0].set_title(f"data: {int(labels.max()) + 1} partitions")
    for ax, (name, x) in zip(axes.flat[1:], samples.items()):
        ed = results["monolith" if name == "monolith" else "rules"]
        ed = ed["energy_distance"] if name == "monolith" else ed[name]["energy_distance"]
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:blue" if name != "monolith" else "tab:gray")
        ax.set_title(f"{name}  ED={ed:.4f}")
    for ax in axes.flat:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_results(results: dict) -> str:
    """A small table of energy distances (lower is better) and expert forwards per sample."""
    lines = [
        f"{'sampler':<14}{'energy dist':>12}{'expert fwd/sample':>19}",
        f"{'monolith':<14}{results['monolith']['energy_distance']:>12.4f}{results['monolith']['expert_forwards_per_sample']:>19.0f}",
    ]
    for name, r in results["rules"].items():
        lines.append(f"{'ens ' + name:<14}{r['energy_distance']:>12.4f}{r['expert_forwards_per_sample']:>19.0f}")
    lines.append(f"{'(data floor)':<14}{results['data_floor']:>12.4f}")
    lines.append(f"{'(noise)':<14}{results['noise_baseline']:>12.4f}")
    return "\n".join(lines)
