"""What sampling costs under each rule (router included, exact), and evaluation streams that give
every rule the same initial noise whatever the batch size and whatever the rule draws."""

import pytest
import torch

from ddm.ensemble.combine import Ensemble, Rule
from ddm.ensemble.cost import ensemble_sampling_cost, single_model_sampling_cost
from ddm.ensemble.sample import RULE_DRAWS, SamplingConfig, draw, initial_noise, stream
from ddm.models.build import build_model, build_router
from ddm.models.config import ModelConfig, forward_flops
from ddm.models.flow import FlowMatching, guided

EXPERT = ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10)
ROUTER = ModelConfig("DiT-Micro/4", (1, 8, 8), num_classes=10)
K = 3


def perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A network whose zero-initialised output layers are not zero (so routing is not uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def ensemble():
    torch.manual_seed(0)
    experts = [perturbed(build_model(EXPERT), i) for i in range(K)]
    return Ensemble(experts, perturbed(build_router(ROUTER, K), 99))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampling_flops_per_rule_are_exact(ensemble, guidance, sampler):
    """Per sample: evals x (router + routed experts x CFG branches) forwards, each at forward_flops;
    the router runs once per evaluation (conditional only), the oracle has none."""
    fe = forward_flops(EXPERT)
    fr = forward_flops(ROUTER, router=True, num_partitions=K)
    cfg = SamplingConfig(num_samples=10, steps=3, sampler=sampler, guidance=guidance, seed=0, batch_size=4)
    evals = cfg.evals_per_sample
    branches = 1 if guidance == 1.0 else 2
    labels = torch.arange(10) % 10
    parts = torch.arange(10) % K
    expected = {
        "top1": evals * (branches * fe + fr),
        "top-2": evals * (2 * branches * fe + fr),
        "full": evals * (K * branches * fe + fr),
        "sample": evals * (branches * fe + fr),
        "oracle": evals * branches * fe,
    }
    for rule, flops in expected.items():
        ensemble.rule = Rule.parse(rule)
        ensemble.reset_stats()
        gen = stream(0, RULE_DRAWS)

        def velocity(rows):
            return ensemble.velocity_fn(labels[rows], parts[rows], guidance, generator=gen)

        draw(FlowMatching(), velocity, cfg, EXPERT.data_shape)
        st = ensemble.stats
        cost = ensemble_sampling_cost([fe] * K, fr, st.expert_evals, st.router_evals, st.velocity_evals, evals)
        assert cost["sampling_flops_per_sample"] == pytest.approx(flops, rel=1e-12), rule
        router_part = 0.0 if rule == "oracle" else evals * fr
        assert cost["router_share"] == pytest.approx(router_part / flops, rel=1e-12), rule
        assert cost["router_forwards_per_sample"] == (0 if rule == "oracle" else evals), rule
    one = single_model_sampling_cost(fe, evals, branches)
    assert one["sampling_flops_per_sample"] == evals * branches * fe and one["router_share"] == 0.0


def test_the_router_is_a_small_share_by_default():
    """The default routers cost about 5% of a DiT-Tiny expert's forward (the paper: ~4%)."""
    from ddm.core.config import load
    from ddm.launchers.spec import RunSpec

    for spec in ("launch/digits.yaml", "launch/glyphs.yaml"):
        s = load(RunSpec, spec)
        share = forward_flops(s.router.model, router=True, num_partitions=4) / forward_flops(s.expert.model)
        assert 0.03 < share < 0.07, (spec, share)


def test_initial_noise_depends_on_the_seed_and_index_only():
    whole = initial_noise(5, 0, 700, (1, 4, 4))
    parts = torch.cat([initial_noise(5, a, b - a, (1, 4, 4)) for a, b in ((0, 3), (3, 300), (300, 511), (511, 700))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, initial_noise(6, 0, 700, (1, 4, 4)))
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1) < 0.05


@pytest.mark.parametrize("batch_size", [3, 7, 64])
def test_every_rule_starts_from_the_same_noise(batch_size):
    """Experts with a zero velocity (a DiT's output layer starts at zero) turn each rule's initial
    noise into its samples: every rule, the sample rule with its own draws too, and every batch
    size give the same samples, the noise of the seed."""
    torch.manual_seed(0)
    experts = [build_model(EXPERT) for _ in range(K)]
    ens = Ensemble(experts, perturbed(build_router(ROUTER, K), 1))
    cfg = SamplingConfig(num_samples=20, steps=2, sampler="heun", seed=3, batch_size=batch_size)
    labels, parts = torch.arange(20) % 10, torch.arange(20) % K
    expected = initial_noise(3, 0, 20, EXPERT.data_shape)
    for rule in ("top1", "top2", "full", "sample", "oracle"):
        ens.rule = Rule.parse(rule)
        gen = stream(cfg.seed, RULE_DRAWS)
        x = draw(FlowMatching(), lambda rows: ens.velocity_fn(labels[rows], parts[rows], generator=gen), cfg, (1, 8, 8))
        assert torch.equal(x, expected), rule
    one = draw(FlowMatching(), lambda rows: guided(experts[0], labels[rows]), cfg, (1, 8, 8))
    assert torch.equal(one, expected)  # a one-model baseline too


def test_the_runs_seed_drives_sampling_and_evaluation_unless_set_apart():
    from ddm.core.config import load
    from ddm.launchers.spec import RunSpec

    s = load(RunSpec, "launch/digits.yaml", ["seed=7"]).resolved()
    assert s.sample.seed == 7 and s.evaluate.seed == 7
    s = load(RunSpec, "launch/digits.yaml", ["seed=7", "evaluate.seed=2"]).resolved()
    assert s.sample.seed == 7 and s.evaluate.seed == 2
    with pytest.raises(ValueError, match="seed set"):
        draw(FlowMatching(), None, SamplingConfig(), (1, 8, 8))
