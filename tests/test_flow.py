"""Tier 1: the flow-matching path, loss, time sampling, ODE samplers and guidance."""

import math

import pytest
import torch

from ddm.models.flow import FlowMatching, guided


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


def test_guidance_extrapolates_a_bf16_models_velocities_in_fp32():
    """A bf16 model (autocast) guided at 3.1 (3.09375 in bf16): the extrapolation is computed in fp32
    and rounded once, as the closed form says; in bf16 it would be off by more."""
    v_c, v_u = torch.tensor([[-1.125]]), torch.tensor([[-0.083984375]])  # exact in bf16

    def model(x, t, y):
        return torch.where(y[:, None] == 9, v_u, v_c).to(torch.bfloat16)  # label 9 is the null label

    x, t, y = torch.zeros(1, 1), torch.full((1,), 0.5), torch.tensor([2])
    scale = torch.tensor([3.1])
    v = guided(model, y, scale=scale, null_label=9)(x, t)
    c, u = v_c.bfloat16().float(), v_u.bfloat16().float()
    assert v.dtype == torch.bfloat16 and torch.equal(v, (u + 3.1 * (c - u)).bfloat16())
    in_bf16 = u.bfloat16() + scale.bfloat16() * (c.bfloat16() - u.bfloat16())
    assert not torch.equal(v, in_bf16)  # the bf16 computation would have given another value


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
    from ddm.core.config import load
    from ddm.train.job import JobConfig

    ddpm = ["flow.path=vp", "flow.prediction=epsilon"]
    load(JobConfig, None, ["store=/s", *ddpm])  # a DDPM expert is fine
    with pytest.raises(ValueError, match="regresses the ensemble's velocity"):
        load(JobConfig, None, ["store=/s", "job=distill", "teacher=abc", *ddpm])
    load(JobConfig, None, ["store=/s", *ddpm, "model.learn_sigma=true"])  # a DDPM expert with DiT's variance head
    for wrong in (["model.learn_sigma=true"], ["job=router", *ddpm, "model.learn_sigma=true"]):
        with pytest.raises(ValueError, match="model.learn_sigma is a DDPM expert's variance head"):
            load(JobConfig, None, ["store=/s", *wrong])


# --- a learned sigma: improved DDPM's bound of one reverse step, against its discrete closed forms --
def _ddpm_step(t: torch.Tensor):
    """(alpha_bar(t), alpha_bar(t - 1/1000)) from the path's alpha, and DDPM's beta and beta~."""
    from ddm.models.flow import VPPath

    path = VPPath()
    ab_t, ab_s = path.alpha(t) ** 2, path.alpha(t - 1e-3) ** 2
    beta = 1 - ab_t / ab_s
    return ab_t, ab_s, beta, beta * (1 - ab_s) / (1 - ab_t)


def test_the_step_bound_is_zero_for_the_true_step_and_the_closed_form_otherwise():
    """KL(q(x_s | x_t, x_0) || p(x_s | x_t)) in bits per dimension: 0 with the true noise and
    variance beta~ (v = -1); 0.5 (beta~/beta - 1 - log(beta~/beta)) / ln 2 with variance beta
    (v = +1); a noise error d adds c0^2 (1 - ab) / ab d^2 / (2 var) (c0 the posterior mean's
    x_0 coefficient); the first step counts 0."""
    from ddm.models.flow import VPPath

    g = torch.Generator().manual_seed(0)
    n = 6
    t = torch.tensor([0.0005, 0.01, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    x0, eps = (torch.randn(n, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ab_t, ab_s, beta, beta_post = _ddpm_step(t)
    x_t = ab_t.sqrt()[:, None, None, None] * x0 + (1 - ab_t).sqrt()[:, None, None, None] * eps
    kl = VPPath().step_kl_bits
    ones = torch.ones_like(x0)
    torch.testing.assert_close(kl(-ones, eps, x0, x_t, t), torch.zeros(n, dtype=torch.float64), atol=1e-9, rtol=0)
    r = beta_post / beta
    want = 0.5 * (r - 1 - r.log()) / math.log(2)
    want[0] = 0.0  # t < 1.5/1000: the first step
    torch.testing.assert_close(kl(ones, eps, x0, x_t, t), want, atol=1e-9, rtol=1e-6)
    d = 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    c0 = ab_s.sqrt() * beta / (1 - ab_t)
    shift = (c0**2 * (1 - ab_t) / ab_t)[:, None, None, None] * d**2
    want = (shift / (2 * beta_post[:, None, None, None])).flatten(1).mean(1) / math.log(2)
    want[0] = 0.0
    torch.testing.assert_close(kl(-ones, eps + d, x0, x_t, t), want, atol=1e-9, rtol=1e-6)


def test_a_learned_sigma_trains_its_variance_from_the_bound_and_its_mean_from_the_mse():
    """training_losses with a learn_sigma DiT: loss = MSE + bound; the bound's gradient reaches
    the variance half of the output layer only (the mean is detached, as improved DDPM)."""
    from ddm.models.build import build_model
    from ddm.models.config import ModelConfig

    model = build_model(ModelConfig("DiT-Micro/2", (2, 4, 4), learn_sigma=True))
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    flow = FlowMatching(path="vp", prediction="epsilon", time_sampling="uniform")
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = flow.training_losses(model, x0, generator=torch.Generator().manual_seed(2))
    assert out["vb"].shape == (4,) and (out["vb"] > 0).all() and torch.isfinite(out["loss"]).all()
    out["vb"].sum().backward()
    w = model.final_layer.linear.weight.grad.reshape(2, 2, 4, -1)  # rows: (patch row, patch col, C')
    assert w[..., :2, :].abs().max() == 0 and w[..., 2:, :].abs().max() > 0  # noise half: no gradient
    with pytest.raises(ValueError, match=r"a learned sigma is a DDPM expert's"):
        FlowMatching().training_losses(model, x0)
