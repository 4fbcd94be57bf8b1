"""Tier 2: the ensemble formula against closed forms on Gaussian mixtures.

Exact experts are the mixture components' own flow-matching velocities and the exact router is
their posterior p(k | x_t). The DDM identity sum_k p(k|x) u^k(x) = u(x) is checked against the
marginal velocity computed independently from the score of the noised mixture density.
"""

import pytest
import torch

from ddm.ensemble.analytic import GaussianMixture
from ddm.ensemble.combine import Ensemble, Rule
from ddm.eval.metrics import energy_distance
from ddm.models.flow import FlowMatching


def exact_ensemble(gm: GaussianMixture, flow: FlowMatching, rule: str) -> Ensemble:
    experts = [gm.expert(k, flow) for k in range(gm.num_components)]
    return Ensemble(experts, gm.router(flow), Rule.parse(rule))


def noised_points(gm, flow, n, g, t_lo=0.01, t_hi=0.99):
    x0, _ = gm.sample(n, g)
    t = t_lo + (t_hi - t_lo) * torch.rand(n, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return flow.interpolate(x0, noise, t), t


def unequal_mixture() -> GaussianMixture:
    """Components of different widths and weights, not on a symmetric layout, in 3-D."""
    g = torch.Generator().manual_seed(3)
    means = 2.0 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.2, 0.5, 0.9, 0.3, 1.2]), torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15]))


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("mixture", ["ring", "unequal"])
def test_full_rule_equals_closed_form_marginal_velocity(path, mixture):
    gm = GaussianMixture.ring(4, dim=3, radius=2.0, std=0.5) if mixture == "ring" else unequal_mixture()
    flow = FlowMatching(path=path)
    x, t = noised_points(gm, flow, 2000, torch.Generator().manual_seed(0))
    v = exact_ensemble(gm, flow, "full").velocity(x, t)
    u = gm.marginal_velocity(x, t, flow)
    assert u.abs().max() > 1.0  # a non-trivial field
    torch.testing.assert_close(v, u, rtol=0, atol=1e-10)


def test_single_component_velocity_matches_its_score_form():
    """With K = 1, the component formula and the score-based marginal must agree (two derivations)."""
    gm = GaussianMixture(torch.tensor([[1.0, -2.0]]), torch.tensor([0.7]), torch.tensor([1.0]))
    flow = FlowMatching()
    x, t = noised_points(gm, flow, 500, torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        gm.component_velocity(x, t, 0, flow), gm.marginal_velocity(x, t, flow), rtol=0, atol=1e-10
    )


def test_component_velocity_is_conditional_expectation_of_target():
    """u^k(x) = E[d/dt x_t | x_t = x, k], checked by Monte Carlo regression on a 1-D Gaussian."""
    gm = GaussianMixture(torch.tensor([[1.5]]), torch.tensor([0.5]), torch.tensor([1.0]))
    flow = FlowMatching()
    g = torch.Generator().manual_seed(2)
    t = torch.full((400_000,), 0.4, dtype=torch.float64)
    x0, _ = gm.sample(t.shape[0], g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t, target = flow.interpolate(x0, noise, t), flow.target_velocity(x0, noise, t)
    # In the Gaussian case E[target | x_t] is affine in x_t: least squares recovers it.
    design = torch.cat([x_t, torch.ones_like(x_t)], dim=1)
    coef = torch.linalg.lstsq(design, target).solution
    probe = torch.tensor([[-1.0], [0.0], [0.6], [2.0]], dtype=torch.float64)
    mc = torch.cat([probe, torch.ones_like(probe)], dim=1) @ coef
    exact = gm.component_velocity(probe, torch.full((4,), 0.4, dtype=torch.float64), 0, flow)
    torch.testing.assert_close(mc, exact, rtol=0, atol=0.01)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_ode_sampling_with_full_rule_reproduces_the_mixture(path):
    gm = GaussianMixture.ring(4, dim=3, radius=2.0, std=0.5)
    flow = FlowMatching(path=path)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    samples = flow.sample(exact_ensemble(gm, flow, "full").velocity_fn(), noise, num_steps=100, method="heun")
    torch.testing.assert_close(samples.mean(0), gm.mean(), rtol=0, atol=0.08)
    torch.testing.assert_close(torch.cov(samples.T), gm.covariance(), rtol=0, atol=0.12)
    data, _ = gm.sample(4000, g)
    baseline = energy_distance(torch.randn(4000, 3, generator=g, dtype=torch.float64), data)
    ed = energy_distance(samples, data)
    assert ed < 0.01, ed
    assert ed < 0.05 * baseline, (ed, baseline)


def test_top1_exact_where_components_are_far_apart():
    """Far apart and at low noise the posterior is one-hot, so top-1 loses nothing."""
    gm = GaussianMixture.ring(4, dim=2, radius=8.0, std=0.3)
    flow = FlowMatching()
    x, t = noised_points(gm, flow, 2000, torch.Generator().manual_seed(0), t_hi=0.5)
    assert gm.posterior(x, t, flow).max(dim=1).values.min() > 1 - 1e-6
    top1 = exact_ensemble(gm, flow, "top1").velocity(x, t)
    torch.testing.assert_close(top1, gm.marginal_velocity(x, t, flow), rtol=0, atol=1e-5)


def test_top1_measurably_off_where_components_overlap():
    gm = GaussianMixture.ring(4, dim=2, radius=1.0, std=0.8)
    flow = FlowMatching()
    g = torch.Generator().manual_seed(0)
    x, t = noised_points(gm, flow, 2000, g, t_lo=0.1, t_hi=0.9)
    u = gm.marginal_velocity(x, t, flow)
    rel_err = (exact_ensemble(gm, flow, "top1").velocity(x, t) - u).norm(dim=1).mean() / u.norm(dim=1).mean()
    assert rel_err > 0.2, rel_err
    # ... and it shows in the samples: top-1 drifts from the data, full does not.
    noise = torch.randn(3000, 2, generator=g, dtype=torch.float64)
    data, _ = gm.sample(3000, g)
    ed = {
        r: energy_distance(flow.sample(exact_ensemble(gm, flow, r).velocity_fn(), noise, 60, "heun"), data)
        for r in ("full", "top1")
    }
    assert ed["full"] < 0.01, ed
    assert ed["top1"] > 5 * ed["full"] and ed["top1"] > 0.03, ed


def test_topk_with_all_experts_is_exact_and_top2_between():
    gm = GaussianMixture.ring(3, dim=2, radius=1.5, std=0.6)
    flow = FlowMatching()
    x, t = noised_points(gm, flow, 1000, torch.Generator().manual_seed(4))
    u = gm.marginal_velocity(x, t, flow)
    torch.testing.assert_close(exact_ensemble(gm, flow, "top-3").velocity(x, t), u, rtol=0, atol=1e-10)
    err = {r: (exact_ensemble(gm, flow, r).velocity(x, t) - u).norm(dim=1).mean() for r in ("top1", "top2")}
    assert err["top2"] < err["top1"]


# --- experts of other kinds: DDPM (epsilon on the VP path) and other flow-matching paths ---------

DDPM = FlowMatching(path="vp", prediction="epsilon", time_sampling="uniform")


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_an_exact_ddpm_expert_converted_is_the_exact_velocity(path):
    """An exact epsilon-predictor on DDPM's schedule, asked at the time of equal SNR on the
    rescaled state, gives the component's exact flow-matching velocity on the ensemble's path."""
    from ddm.models.flow import converted

    mix, flow = GaussianMixture.ring(3, dim=2), FlowMatching(path=path)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    for t_val in (0.02, 0.3, 0.5, 0.8, 0.99):  # inside DDPM's SNR range (it ends at alpha_bar = 4.3e-5)
        t = torch.full((64,), t_val, dtype=torch.float64)
        for k in range(3):
            v = converted(mix.expert(k, DDPM), DDPM, flow)(x, t)
            torch.testing.assert_close(v, mix.component_velocity(x, t, k, flow), rtol=1e-9, atol=1e-9)
    # The noise-free end (Heun's last evaluation): x_0 = x and E[eps | x_0] = 0, so v = alpha'(0) x.
    t0 = torch.zeros(64, dtype=torch.float64).expand(64)  # a shared time stays shared through it
    torch.testing.assert_close(converted(mix.expert(0, DDPM), DDPM, flow)(x, t0), flow.coefficients(t0)[2][0] * x)


def test_a_mixed_ensemble_full_rule_equals_the_mixtures_marginal_velocity():
    """Two DDPM experts and two flow-matching experts on another path (cosine), combined in a
    linear-path ensemble by the exact router's full rule: the marginal velocity of the mixture."""
    from ddm.models.flow import converted

    mix, flow, cosine = GaussianMixture.ring(4, dim=2), FlowMatching(path="linear"), FlowMatching(path="cosine")
    kinds = [DDPM, cosine, DDPM, flow]
    experts = [converted(mix.expert(k, own), own, flow) for k, own in enumerate(kinds)]
    ens = Ensemble(experts, mix.router(flow), Rule("full"))
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    for t_val in (0.1, 0.5, 0.9):
        t = torch.full((128,), t_val, dtype=torch.float64)
        torch.testing.assert_close(ens.velocity(x, t), mix.marginal_velocity(x, t, flow), rtol=1e-9, atol=1e-9)
