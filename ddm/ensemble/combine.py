"""Combining K experts with a router: the Decentralized Flow Matching velocity.

The marginal velocity of the whole dataset is the posterior-weighted sum of the per-partition
velocities,

    u_t(x) = sum_k p(k | x_t = x) u_t^k(x),

so with the router estimating p(k | x_t, t, c) the "full" rule is exact. Sparse rules (the
paper's Table 1) keep a few experts and renormalise their weights; top-1 is the default and
the best FID per FLOP. Every rule here *weights* velocities (never overwrites one with another),
and sparse rules run each expert only on the rows routed to it, so top-1 costs one expert
forward per sample plus the router.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ddm.ensemble.rules import Rule
from ddm.models.flow import VelocityFn, guided, unguided
from ddm.models.layers import is_shared

Model = Callable[..., torch.Tensor]  # model(x, t, y)


def _renormalised(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    w = torch.where(keep, probs, torch.zeros_like(probs))
    return w / w.sum(dim=1, keepdim=True)


def _ranked(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted high to low; a stable sort sends ties to the lower expert index."""
    return torch.sort(probs, dim=1, descending=True, stable=True)


def _keep_top(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[i]`` most probable experts of each row."""
    _, order = _ranked(probs)
    ranks = torch.arange(probs.shape[1], device=probs.device).expand_as(probs)
    keep_sorted = ranks < counts.unsqueeze(1)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def routing_weights(
    probs: torch.Tensor | None,
    rule: Rule,
    partition: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_experts: int | None = None,
) -> torch.Tensor:
    """(N, K) expert weights, each row summing to 1, from router posteriors (N, K).

    ``partition`` (N,) is needed by the oracle rule only; it then also sets K from ``num_experts``.
    """
    if rule.name == "oracle":
        if partition is None:
            raise ValueError("the oracle rule needs the true partition of every sample (partition=...)")
        k = num_experts if num_experts is not None else probs.shape[1]
        if partition.min() < 0 or partition.max() >= k:
            raise ValueError(
                f"oracle partitions must lie in [0, {k - 1}], got [{int(partition.min())}, {int(partition.max())}]"
            )
        return torch.nn.functional.one_hot(partition.long(), k).float()
    assert probs is not None and probs.ndim == 2
    n, k = probs.shape
    if rule.name == "full":
        return probs / probs.sum(dim=1, keepdim=True)
    if rule.name == "top1":  # argmax returns the first maximum: ties go to the lower index
        return torch.nn.functional.one_hot(probs.argmax(dim=1), k).to(probs.dtype)
    if rule.name == "topk":
        top = min(rule.k, k)
        return _renormalised(probs, _keep_top(probs, torch.full((n,), top, device=probs.device)))
    if rule.name == "threshold":
        keep = probs >= rule.threshold
        keep |= _keep_top(probs, torch.ones(n, dtype=torch.long, device=probs.device))  # never empty
        return _renormalised(probs, keep)
    if rule.name == "nucleus":
        sorted_p, _ = _ranked(probs)
        mass_before = sorted_p.cumsum(dim=1) - sorted_p  # mass of the strictly more probable experts
        counts = (mass_before < rule.top_p).sum(dim=1).clamp(min=1)
        return _renormalised(probs, _keep_top(probs, counts))
    assert rule.name == "sample"
    # Drawn where the generator lives (samplers keep one CPU stream for every device).
    on = probs if generator is None else probs.to(generator.device)
    choice = torch.multinomial(on, 1, generator=generator).squeeze(1).to(probs.device)
    return torch.nn.functional.one_hot(choice, k).float()


def _rows_of(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]``, keeping a shared time shared (stride 0: ``TimestepEmbedder`` embeds it once)."""
    return t[:1].expand(len(rows)) if is_shared(t) else t[rows]


@dataclass
class ForwardStats:
    """Counts of network evaluations, in samples (a batch of N counts N).

    With classifier-free guidance an expert call evaluates two branches and counts twice.
    """

    expert_evals: list[int]
    router_evals: int = 0
    velocity_evals: int = 0

    @property
    def expert_forwards_per_eval(self) -> float:
        """Expert forwards per sample per ensemble-velocity evaluation (top-1: 1, full: K)."""
        return sum(self.expert_evals) / max(self.velocity_evals, 1)

    @property
    def router_forwards_per_eval(self) -> float:
        return self.router_evals / max(self.velocity_evals, 1)


@dataclass
class Ensemble:
    """K expert velocity models and a router, combined by a rule."""

    experts: Sequence[Model]
    router: Model | None
    rule: Rule = field(default_factory=Rule)
    description: dict | None = None  # ensemble.json, for ensembles loaded from a store
    stats: ForwardStats = field(init=False)

    def __post_init__(self) -> None:
        if len(self.experts) < 1:
            raise ValueError("an ensemble needs at least one expert")
        num_partitions = getattr(self.router, "num_partitions", None)
        if num_partitions is not None and num_partitions != len(self.experts):
            raise ValueError(
                f"the router predicts {num_partitions} partitions but the ensemble has {len(self.experts)} experts; "
                "use the router trained on the same partitioning as the experts"
            )
        if self.router is None and self.rule.name != "oracle":
            raise ValueError(f"rule {self.rule} needs a router; only the oracle rule runs without one")
        self.stats = ForwardStats([0] * len(self.experts))

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def reset_stats(self) -> None:
        self.stats = ForwardStats([0] * self.num_experts)

    def posterior(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Router posterior p(k | x_t, t, y), (N, K)."""
        assert self.router is not None
        logits = self.router(x, t, y)
        if logits.ndim != 2 or logits.shape != (x.shape[0], self.num_experts):
            raise ValueError(
                f"the router returned logits of shape {tuple(logits.shape)}; expected ({x.shape[0]}, "
                f"{self.num_experts}) "
                f"for {self.num_experts} experts"
            )
        self.stats.router_evals += x.shape[0]
        # At least float32 for the softmax; float64 inputs keep float64 (the analytic tests need it).
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=1)

    def weights(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        partition: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        probs = None if self.rule.name == "oracle" else self.posterior(x, t, y)
        return routing_weights(probs, self.rule, partition, generator, self.num_experts)

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        partition: torch.Tensor | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """sum_k w_k(x, t, y) v_k(x, t, y), evaluating expert k only where w_k > 0.

        The oracle rule with ``partition`` on the host (distillation's teacher: the data reader's
        partitions) finds each expert's rows there, so a step on a GPU never waits for the device;
        the other rules read which experts the router chose (one sync per call)."""
        n = x.shape[0]
        cost = 1 if (y is None or unguided(guidance_scale)) else 2
        out = torch.zeros_like(x)
        if self.rule.name == "oracle" and partition is not None and partition.device.type == "cpu":
            if len(partition) and (partition.min() < 0 or partition.max() >= self.num_experts):
                routing_weights(None, self.rule, partition, num_experts=self.num_experts)  # raises its clear error
            for k in range(self.num_experts):
                rows = torch.nonzero(partition == k).squeeze(1)  # on the host: no device read
                if rows.numel():
                    self._add(out, k, rows.to(x.device, non_blocking=True), rows.numel(), None, x, t, y, guidance_scale)
                    self.stats.expert_evals[k] += cost * rows.numel()
            self.stats.velocity_evals += n
            return out
        w = self.weights(x, t, y, partition, generator)  # (N, K)
        hard = self.rule.name in ("top1", "sample", "oracle")  # one-hot weights: no multiply needed
        routed = (w > 0).T  # (K, N)
        counts = routed.sum(dim=1).tolist()  # one sync for all experts
        for k in range(self.num_experts):
            if counts[k] == 0:
                continue  # nobody routed here: no forward
            rows = torch.nonzero(routed[k]).squeeze(1)
            self.stats.expert_evals[k] += cost * counts[k]
            self._add(out, k, rows, counts[k], None if hard else w[rows, k], x, t, y, guidance_scale)
        self.stats.velocity_evals += n
        return out

    def _add(self, out, k: int, rows, count: int, wk, x, t, y, guidance_scale) -> None:
        """``out[rows] += wk * v_k(x[rows], t[rows], y[rows])`` (``wk`` None: weight one)."""
        expert, n = self.experts[k], x.shape[0]
        whole = count == n  # the whole batch: skip gather/scatter
        x_k, t_k = (x, t) if whole else (x[rows], _rows_of(t, rows))
        y_k = None if y is None else (y if whole else y[rows])
        scale = guidance_scale
        if isinstance(scale, torch.Tensor) and not whole:  # one scale per sample: those of the rows
            scale = scale[rows]
        v = guided(expert, y_k, scale)(x_k, t_k)
        if v.shape != x_k.shape:
            raise ValueError(
                f"expert {k} returned a velocity of shape {tuple(v.shape)} for inputs of shape {tuple(x_k.shape)}; "
                "all experts must model the data shape the ensemble samples"
            )
        v = v.to(out.dtype)  # under bf16 autocast the experts return bf16; the sum stays in x's dtype
        if wk is not None:
            v = wk.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) * v
        if whole:
            out += v
        else:
            out.index_add_(0, rows, v)

    def velocity_fn(
        self,
        y: torch.Tensor | None = None,
        partition: torch.Tensor | None = None,
        guidance_scale: float | torch.Tensor = 1.0,
        generator: torch.Generator | None = None,
    ) -> VelocityFn:
        """Bind labels/partitions: a v(x, t) for ``FlowMatching.sample``."""
        return lambda x, t: self.velocity(x, t, y, partition, guidance_scale, generator)
