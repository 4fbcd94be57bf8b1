"""An isotropic Gaussian mixture, for which flow matching has closed forms.

For x_0 ~ N(mu_k, s_k^2 I) and x_t = a x_0 + s eps (a = alpha(t), s = sigma(t)):

    x_t | k        ~ N(a mu_k, v_k I),                 v_k = a^2 s_k^2 + s^2
    E[x_0 | x_t, k] = mu_k + a s_k^2 / v_k (x - a mu_k)
    E[eps | x_t, k] = s / v_k (x - a mu_k)
    u_t^k(x)        = a' E[x_0 | x_t, k] + s' E[eps | x_t, k]        (component velocity)
    p(k | x_t = x) ∝ pi_k N(x; a mu_k, v_k I)                          (posterior)

and, independently of the components, the marginal velocity follows from the score of the
noised marginal p_t (Tweedie): E[x_0 | x] = (x + s^2 grad log p_t(x)) / a,
E[eps | x] = -s grad log p_t(x), u_t(x) = a' E[x_0 | x] + s' E[eps | x].
The DDM identity says sum_k p(k | x) u_t^k(x) = u_t(x); the tests check it to float precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddm.models.flow import FlowMatching


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1)


@dataclass
class GaussianMixture:
    """sum_k weights_k N(means_k, stds_k^2 I) in D dimensions."""

    means: torch.Tensor  # (K, D)
    stds: torch.Tensor  # (K,)
    weights: torch.Tensor  # (K,), sums to 1

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        k = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError(
                f"means (K, D), stds (K,) and weights (K,) disagree: {tuple(self.means.shape)}, "
                f"{tuple(self.stds.shape)}, {tuple(self.weights.shape)}"
            )
        if (self.stds <= 0).any() or (self.weights < 0).any():
            raise ValueError("mixture stds must be > 0 and weights >= 0")
        self.weights = self.weights / self.weights.sum()

    @classmethod
    def ring(cls, num_components: int, dim: int = 2, radius: float = 4.0, std: float = 0.3) -> "GaussianMixture":
        """Equal-weight components evenly spaced on a circle in the first two coordinates."""
        if dim < 2:
            raise ValueError(f"a ring mixture needs dim >= 2, got {dim}")
        angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
        means = torch.zeros(num_components, dim, dtype=torch.float64)
        means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
        return cls(means, torch.full((num_components,), std), torch.ones(num_components))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # --- the data distribution ------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (float64) and their component indices."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + _col(self.stds[comp]) * noise, comp

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov = sum_k pi_k (s_k^2 I + mu_k mu_k^T) - mu mu^T."""
        mu = self.mean()
        second = torch.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        second += torch.eye(self.dim, dtype=torch.float64) * (self.weights * self.stds**2).sum()
        return second - torch.outer(mu, mu)

    # --- the noised marginals p_t -----------------------------------------------------------
    def _coeffs(self, t: torch.Tensor, flow: FlowMatching):
        a, s, da, ds = (_col(c.to(torch.float64)) for c in flow.coefficients(t.to(torch.float64)))
        return a, s, da, ds  # each (N, 1)

    def component_log_probs(self, x: torch.Tensor, t: torch.Tensor, flow: FlowMatching) -> torch.Tensor:
        """log pi_k + log N(x; a mu_k, v_k I), (N, K)."""
        a, s, _, _ = self._coeffs(t, flow)
        var = a**2 * self.stds**2 + s**2  # (N, K)
        sq = ((x.unsqueeze(1) - a.unsqueeze(2) * self.means) ** 2).sum(-1)  # (N, K)
        return torch.log(self.weights) - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def posterior(self, x: torch.Tensor, t: torch.Tensor, flow: FlowMatching) -> torch.Tensor:
        """p(k | x_t = x), (N, K)."""
        return self.component_log_probs(x, t, flow).softmax(dim=1)

    def component_velocity(self, x: torch.Tensor, t: torch.Tensor, k: int, flow: FlowMatching) -> torch.Tensor:
        """u_t^k(x), the exact flow-matching velocity of component k alone, (N, D)."""
        a, s, da, ds = self._coeffs(t, flow)
        var = a**2 * self.stds[k] ** 2 + s**2
        resid = x - a * self.means[k]
        e_x0 = self.means[k] + a * self.stds[k] ** 2 / var * resid
        e_eps = s / var * resid
        return da * e_x0 + ds * e_eps

    def component_epsilon(self, x: torch.Tensor, t: torch.Tensor, k: int, flow: FlowMatching) -> torch.Tensor:
        """E[eps | x_t = x, k], what an exact epsilon-prediction (DDPM) expert of component k gives."""
        a, s, _, _ = self._coeffs(t, flow)
        return s / (a**2 * self.stds[k] ** 2 + s**2) * (x - a * self.means[k])

    def marginal_velocity(self, x: torch.Tensor, t: torch.Tensor, flow: FlowMatching) -> torch.Tensor:
        """u_t(x) of the whole mixture from the score of p_t (autograd), not from the components."""
        a, s, da, ds = self._coeffs(t, flow)
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            log_p = torch.logsumexp(self.component_log_probs(xg, t, flow), dim=1)
            (score,) = torch.autograd.grad(log_p.sum(), xg)
        e_x0 = (x + s**2 * score) / a
        e_eps = -s * score
        return da * e_x0 + ds * e_eps

    # --- as models, for the ensemble --------------------------------------------------------
    def expert(self, k: int, flow: FlowMatching):
        """Exact expert k as a model(x, t, y): its velocity, or its noise for an epsilon flow."""
        if flow.prediction == "epsilon":
            return lambda x, t, y=None: self.component_epsilon(x.double(), t, k, flow).to(x.dtype)
        return lambda x, t, y=None: self.component_velocity(x.double(), t, k, flow).to(x.dtype)

    def router(self, flow: FlowMatching):
        """Exact router as a model(x, t, y) returning log-posterior logits."""

        def router(x, t, y=None):
            return self.component_log_probs(x.double(), t, flow).to(x.dtype)

        router.num_partitions = self.num_components
        return router
