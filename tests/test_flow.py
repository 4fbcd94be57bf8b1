"""Tier 1: the flow-matching path, loss, time sampling, ODE samplers and guidance."""

import math

import pytest
import torch

from ddm.flow import FlowMatching, guided


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_path_endpoints_and_velocity_is_time_derivative(path):
    flow = FlowMatching(path=path)
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    zeros, ones = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(flow.interpolate(x0, eps, zeros), x0)
    torch.testing.assert_close(flow.interpolate(x0, eps, ones), eps, atol=1e-12, rtol=0)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.9 + 0.05
    h = 1e-6
    fd = (flow.interpolate(x0, eps, t + h) - flow.interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(flow.target_velocity(x0, eps, t), fd, atol=1e-7, rtol=0)


def test_linear_target_is_noise_minus_data():
    flow = FlowMatching(path="linear")
    x0, eps, t = torch.randn(5, 2), torch.randn(5, 2), torch.rand(5)
    torch.testing.assert_close(flow.target_velocity(x0, eps, t), eps - x0)


def test_loss_of_the_exact_velocity_of_a_point_mass_is_zero():
    """For data = a single point mu, u(x, t) = (x - mu) / t exactly (linear path)."""
    mu = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    flow = FlowMatching(path="linear", time_sampling="uniform")
    model = lambda x, t, y: (x - mu) / t[:, None]  # noqa: E731
    losses = flow.training_losses(model, mu.expand(64, 3), generator=torch.Generator().manual_seed(0))
    assert losses["loss"].shape == (64,)
    assert losses["loss"].max() < 1e-20
    # A zero model's loss is |noise - mu|^2 per dim: mean 1 + |mu|^2 / 3 = 2.75 (seeded: any test order).
    wrong = flow.training_losses(
        lambda x, t, y: torch.zeros_like(x), mu.expand(64, 3), generator=torch.Generator().manual_seed(1)
    )
    assert 2.0 < wrong["loss"].mean() < 3.5


def test_training_loss_rejects_shape_mismatch():
    flow = FlowMatching()
    with pytest.raises(ValueError, match="model returned shape"):
        flow.training_losses(lambda x, t, y: x[:, :2], torch.randn(4, 3))


def test_time_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    t = FlowMatching(time_sampling="uniform").sample_time(200_000, generator=g)
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean() - 0.5) < 0.005 and abs(t.var() - 1 / 12) < 0.002
    ln = FlowMatching(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8).sample_time(200_000, generator=g)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean() - 0.5) < 0.01 and abs(logit.std() - 0.8) < 0.01


def test_euler_is_exact_on_straight_paths():
    """Point-mass data: every trajectory is a straight line, so one Euler step lands on mu."""
    mu = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    flow = FlowMatching()
    noise = torch.randn(10, 2, dtype=torch.float64)
    out = flow.sample(lambda x, t: (x - mu) / t[:, None], noise, num_steps=1, method="euler")
    torch.testing.assert_close(out, mu.expand(10, 2))


def _gaussian_flow_error(method: str, steps: int) -> float:
    """Data N(0, s0^2): x(t) = x(1) * std(t), std(t) = sqrt((1-t)^2 s0^2 + t^2); error at t=0."""
    s0 = 0.5
    flow = FlowMatching()

    def velocity(x, t):
        var = (1 - t) ** 2 * s0**2 + t**2
        dvar = -2 * (1 - t) * s0**2 + 2 * t
        return x * (0.5 * dvar / var)[:, None]

    x1 = torch.ones(1, 1, dtype=torch.float64)
    out = flow.sample(velocity, x1, num_steps=steps, method=method)
    return abs(out.item() - s0)


def test_sampler_orders_of_accuracy():
    e_euler = [_gaussian_flow_error("euler", n) for n in (20, 40)]
    e_heun = [_gaussian_flow_error("heun", n) for n in (20, 40)]
    assert 1.7 < e_euler[0] / e_euler[1] < 2.3  # first order
    assert 3.4 < e_heun[0] / e_heun[1] < 4.6  # second order
    assert e_heun[1] < e_euler[1] / 10


def test_sampler_validates_arguments():
    flow = FlowMatching()
    with pytest.raises(ValueError, match="num_steps"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), num_steps=0)
    with pytest.raises(ValueError, match="sampler 'rk4' is unknown"):
        flow.sample(lambda x, t: x, torch.zeros(1, 1), method="rk4")


@pytest.mark.parametrize("field,value", [("path", "vp"), ("time_sampling", "beta"), ("logit_std", 0.0)])
def test_bad_flow_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FlowMatching(**{field: value})


def test_classifier_free_guidance_combination():
    """Guided v = v_u + s (v_c - v_u), one batched forward of both branches."""
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + (y.float() * 10 + 1)[:, None]  # v depends on the label only

    y = torch.tensor([2, 5])
    x, t = torch.zeros(2, 3), torch.full((2,), 0.5)
    null = 7
    v = guided(model, y, scale=3.0, null_label=null)(x, t)
    v_c, v_u = (y.float() * 10 + 1)[:, None], torch.full((2, 1), null * 10 + 1.0)
    torch.testing.assert_close(v, (v_u + 3.0 * (v_c - v_u)).expand(2, 3))
    assert calls == [4]  # one forward over the doubled batch
    torch.testing.assert_close(guided(model, y, scale=1.0)(x, t), v_c.expand(2, 3))
    torch.testing.assert_close(guided(model, y, scale=0.0, null_label=null)(x, t), v_u.expand(2, 3))


def test_guidance_without_labels_is_an_error():
    with pytest.raises(ValueError, match="needs class labels"):
        guided(lambda x, t, y: x, None, scale=4.0)


def test_noised_returns_points_on_the_path():
    flow = FlowMatching(path="cosine")
    x0 = torch.zeros(1000, 2)
    x_t, t = flow.noised(x0, torch.Generator().manual_seed(0))
    # With x0 = 0, x_t = sigma(t) eps, so x_t / sigma(t) is standard normal.
    z = x_t / torch.sin(0.5 * math.pi * t)[:, None]
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1


def test_a_distilled_student_must_predict_velocity():
    from ddm.config import load
    from ddm.job import JobConfig

    ddpm = ["flow.path=vp", "flow.prediction=epsilon"]
    load(JobConfig, None, ["store=/s", *ddpm])  # a DDPM expert is fine
    with pytest.raises(ValueError, match="regresses the ensemble's velocity"):
        load(JobConfig, None, ["store=/s", "job=distill", "teacher=abc", *ddpm])
