"""Tier 1: ensemble combine rules, sparse execution, forward counts and input errors."""

import pytest
import torch

from ddm.ensemble.combine import Ensemble, Rule, routing_weights

P = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])


def weights(rule: str, probs=P, **kw):
    return routing_weights(probs, Rule.parse(rule), **kw)


def test_top1_and_topk_renormalise_over_kept_experts():
    torch.testing.assert_close(weights("top1"), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    # Row 1 has a tie between experts 0 and 1 for second place: the lower index wins.
    torch.testing.assert_close(weights("top-2"), torch.tensor([[0.625, 0.375, 0], [1 / 9, 0, 8 / 9]]))


def test_ties_go_to_the_lower_index():
    uniform = torch.full((3, 4), 0.25)
    torch.testing.assert_close(weights("top1", uniform), torch.tensor([[1.0, 0, 0, 0]] * 3))
    torch.testing.assert_close(weights("top2", uniform), torch.tensor([[0.5, 0.5, 0, 0]] * 3))


def test_k_larger_than_number_of_experts_is_the_full_rule():
    torch.testing.assert_close(weights("top-5"), weights("full"))
    torch.testing.assert_close(weights("top-3"), P)


def test_full_rule_is_the_posterior():
    torch.testing.assert_close(weights("full"), P)


def test_threshold_keeps_experts_above_and_falls_back_to_top1():
    torch.testing.assert_close(weights("threshold:0.25"), torch.tensor([[0.625, 0.375, 0], [0, 0, 1.0]]))
    torch.testing.assert_close(weights("threshold:0.9"), weights("top1"))


def test_nucleus_keeps_smallest_set_reaching_top_p():
    torch.testing.assert_close(weights("nucleus:0.75"), torch.tensor([[0.625, 0.375, 0], [0, 0, 1.0]]))
    torch.testing.assert_close(weights("nucleus:1.0"), P)


def test_sample_rule_draws_one_expert_with_posterior_frequencies():
    probs = torch.tensor([[0.6, 0.3, 0.1]]).expand(60_000, 3)
    w = weights("sample", probs, generator=torch.Generator().manual_seed(0))
    assert torch.all(w.sum(1) == 1) and torch.all((w == 0) | (w == 1))
    torch.testing.assert_close(w.mean(0), probs[0], atol=0.01, rtol=0)
    again = weights("sample", probs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, again)


def test_oracle_uses_given_partitions():
    w = routing_weights(None, Rule("oracle"), partition=torch.tensor([2, 0, 2]), num_experts=3)
    torch.testing.assert_close(w, torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match="needs the true partition"):
        routing_weights(None, Rule("oracle"), num_experts=3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
        routing_weights(None, Rule("oracle"), partition=torch.tensor([3]), num_experts=3)


@pytest.mark.parametrize(
    "text,rule",
    [
        ("top1", Rule("top1")),
        ("top-1", Rule("top1")),
        ("Top-3", Rule("topk", k=3)),
        ("top2", Rule("topk", k=2)),
        ("full", Rule("full")),
        ("threshold:0.3", Rule("threshold", threshold=0.3)),
        ("nucleus", Rule("nucleus")),
        ("sample", Rule("sample")),
        ("oracle", Rule("oracle")),
    ],
)
def test_rule_parsing(text, rule):
    assert Rule.parse(text) == rule
    assert Rule.parse(str(rule)) == rule


@pytest.mark.parametrize(
    "text,match",
    [
        ("top-0", "k >= 1"),
        ("topk", "integer k"),
        ("best", "unknown"),
        ("threshold:abc", "not a number"),
        ("threshold:1.5", r"threshold must be in \(0, 1\]"),
        ("full:2", "takes no argument"),
    ],
)
def test_bad_rules_are_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Rule.parse(text)


# --- the ensemble velocity ------------------------------------------------------------------


class LinearExpert:
    """v = A x + b t (+ label offset), counting the rows it sees."""

    def __init__(self, seed: int, dim: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(dim, dim, generator=g)
        self.b = torch.randn(dim, generator=g)
        self.rows_seen = 0

    def __call__(self, x, t, y=None):
        self.rows_seen += x.shape[0]
        v = x @ self.a.T + t[:, None] * self.b
        return v if y is None else v + y[:, None].float()


class LinearRouter:
    def __init__(self, num_partitions: int, dim: int = 3, seed: int = 100, bias=None):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, num_partitions, generator=g)
        self.bias = torch.zeros(num_partitions) if bias is None else bias
        self.num_partitions = num_partitions

    def __call__(self, x, t, y=None):
        return x @ self.w + self.bias


@pytest.mark.parametrize("rule", ["top1", "top2", "full", "threshold:0.3", "nucleus:0.8", "sample"])
def test_sparse_execution_equals_dense_weighted_sum(rule):
    experts = [LinearExpert(k) for k in range(4)]
    router = LinearRouter(4)
    ens = Ensemble(experts, router, Rule.parse(rule))
    x, t = torch.randn(64, 3), torch.rand(64)
    v = ens.velocity(x, t, generator=torch.Generator().manual_seed(5))
    w = routing_weights(router(x, t).softmax(1), Rule.parse(rule), generator=torch.Generator().manual_seed(5))
    dense = sum(w[:, k : k + 1] * experts[k](x, t) for k in range(4))
    torch.testing.assert_close(v, dense)


def test_forward_counts_per_rule():
    x, t = torch.randn(50, 3), torch.rand(50)
    for rule, per_sample in [("top1", 1.0), ("top2", 2.0), ("full", 4.0), ("sample", 1.0)]:
        experts = [LinearExpert(k) for k in range(4)]
        ens = Ensemble(experts, LinearRouter(4), Rule.parse(rule))
        ens.velocity(x, t)
        assert sum(e.rows_seen for e in experts) == per_sample * 50
        assert ens.stats.expert_forwards_per_eval == per_sample
        assert ens.stats.router_forwards_per_eval == 1.0
        assert ens.stats.expert_evals == [e.rows_seen for e in experts]


def test_partition_nobody_is_routed_to_runs_no_forward():
    class Forbidden:
        def __call__(self, *a):
            raise AssertionError("an expert with no routed rows was evaluated")

    experts = [LinearExpert(0), Forbidden(), LinearExpert(2)]
    router = LinearRouter(3, bias=torch.tensor([0.0, -1e4, 0.0]))
    ens = Ensemble(experts, router, Rule("top1"))
    v = ens.velocity(torch.randn(40, 3), torch.rand(40))
    assert v.shape == (40, 3)
    assert ens.stats.expert_evals[1] == 0
    assert ens.stats.expert_evals[0] + ens.stats.expert_evals[2] == 40


def test_one_expert_everywhere_skips_gather_and_matches_expert():
    experts = [LinearExpert(0), LinearExpert(1)]
    ens = Ensemble(experts, LinearRouter(2, bias=torch.tensor([1e4, 0.0])), Rule("top1"))
    x, t = torch.randn(10, 3), torch.rand(10)
    torch.testing.assert_close(ens.velocity(x, t), LinearExpert(0)(x, t))


def test_oracle_needs_no_router():
    experts = [LinearExpert(k) for k in range(3)]
    ens = Ensemble(experts, None, Rule("oracle"))
    x, t, part = torch.randn(6, 3), torch.rand(6), torch.tensor([0, 1, 2, 2, 1, 0])
    v = ens.velocity(x, t, partition=part)
    ref = torch.stack([LinearExpert(int(k))(x[i : i + 1], t[i : i + 1])[0] for i, k in enumerate(part)])
    torch.testing.assert_close(v, ref)
    assert ens.stats.router_evals == 0


def test_guidance_inside_the_ensemble_counts_two_branches():
    experts = [LinearExpert(k) for k in range(2)]
    for e in experts:
        e.null_label = 9
    ens = Ensemble(experts, LinearRouter(2), Rule("full"))
    x, t, y = torch.randn(8, 3), torch.rand(8), torch.arange(8) % 3
    v = ens.velocity(x, t, y, guidance_scale=2.0)
    w = LinearRouter(2)(x, t).softmax(1)
    ref = 0
    for k, e in enumerate(experts):
        v_c, v_u = e(x, t, y), e(x, t, torch.full_like(y, 9))
        ref = ref + w[:, k : k + 1] * (v_u + 2.0 * (v_c - v_u))
    torch.testing.assert_close(v, ref)
    assert ens.stats.expert_forwards_per_eval == 4.0  # 2 experts x 2 branches


def test_router_classes_must_match_number_of_experts():
    with pytest.raises(ValueError, match="router predicts 3 partitions but the ensemble has 2 experts"):
        Ensemble([LinearExpert(0), LinearExpert(1)], LinearRouter(3), Rule("top1"))

    def anonymous_router(x, t, y=None):  # no num_partitions attribute: caught at the first call
        return torch.zeros(x.shape[0], 5)

    ens = Ensemble([LinearExpert(0), LinearExpert(1)], anonymous_router, Rule("top1"))
    with pytest.raises(ValueError, match=r"logits of shape \(4, 5\); expected \(4, 2\)"):
        ens.velocity(torch.randn(4, 3), torch.rand(4))


def test_rules_other_than_oracle_need_a_router():
    with pytest.raises(ValueError, match="needs a router"):
        Ensemble([LinearExpert(0)], None, Rule("top1"))
    with pytest.raises(ValueError, match="at least one expert"):
        Ensemble([], LinearRouter(1), Rule("top1"))


def test_mismatched_data_shapes_name_the_expert():
    experts = [LinearExpert(0, dim=3), lambda x, t, y=None: x[:, :2]]
    ens = Ensemble(experts, LinearRouter(2), Rule("full"))
    with pytest.raises(ValueError, match="expert 1 returned a velocity of shape"):
        ens.velocity(torch.randn(4, 3), torch.rand(4))


def test_oracle_with_partitions_on_the_host_routes_there_and_equals_the_weighted_sum():
    """Distillation's teacher: the reader's partitions on the host give every expert's rows
    without computing (and reading back) routing weights on the device."""
    experts = [LinearExpert(k) for k in range(3)]
    ens = Ensemble(experts, None, Rule("oracle"))
    x, t, part = torch.randn(30, 3), torch.rand(30), torch.randint(0, 3, (30,))
    dense = sum((part == k).float()[:, None] * experts[k](x, t) for k in range(3))
    ens.weights = lambda *a, **k: (_ for _ in ()).throw(AssertionError("routing weights were computed"))
    torch.testing.assert_close(ens.velocity(x, t, partition=part), dense)
    assert ens.stats.expert_evals == [int((part == k).sum()) for k in range(3)]
    with pytest.raises(ValueError, match=r"oracle partitions must lie in \[0, 2\]"):
        ens.velocity(x, t, partition=torch.full((30,), 3))
