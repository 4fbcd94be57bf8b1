"""Trained proof: K isolated experts + a router, sampled as an ensemble, reproduce the data."""

import json

import pytest

from ddm.core.config import load
from ddm.demo.mixture import DemoConfig, run_demo

SMALL = [
    "data.num_components=4", "data.std=0.3", "data.radius=3", "data.num_train=4000", "data.num_eval=1000",
    "num_partitions=2", "steps_per_expert=400", "router_steps=200", "num_samples=1000", "sample_steps=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = load(DemoConfig, "launch/demo.yaml", SMALL + [f"output_dir={out}"])
    return cfg, run_demo(cfg)


def test_ensemble_samples_are_close_to_the_data(demo):
    _, r = demo
    noise = r["noise_baseline"]
    assert noise > 0.5  # the untrained starting point is far from the data
    for rule in ("full", "top-2", "oracle", "sample"):
        ed = r["rules"][rule]["energy_distance"]
        assert ed < 0.02 and ed < 0.03 * noise, (rule, ed)
    # Top-1 switches experts hard where 2-D posteriors are flat (see tests/test_analytic.py):
    # close to the data, with a looser bound.
    assert r["rules"]["top-1"]["energy_distance"] < 0.08


def test_forward_counts_and_the_monolith_are_reported(demo):
    cfg, r = demo
    evals = 2 * cfg.sample_steps  # Heun
    assert r["rules"]["top-1"]["expert_forwards_per_sample"] == evals
    assert r["rules"]["full"]["expert_forwards_per_sample"] == cfg.num_partitions * evals
    assert r["rules"]["top-1"]["router_forwards_per_sample"] == evals
    assert r["rules"]["oracle"]["router_forwards_per_sample"] == 0
    # Same training FLOPs: K experts' steps plus the router's, in expert-sized steps.
    assert r["monolith_steps"] >= cfg.num_partitions * cfg.steps_per_expert
    assert r["monolith_steps"] < cfg.num_partitions * cfg.steps_per_expert + cfg.router_steps
    assert "energy_distance" in r["monolith"]
    assert sum(r["partition_counts"]) == cfg.data.num_train and min(r["partition_counts"]) > 0


def test_outputs_are_written(demo):
    cfg, r = demo
    on_disk = json.loads((__import__("pathlib").Path(cfg.output_dir) / "results.json").read_text())
    assert on_disk["rules"].keys() == r["rules"].keys()
    assert on_disk["config"]["num_partitions"] == 2
    png = open(r["figure"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(
    "override,match",
    [
        ("num_partitions=0", "num_partitions must be between 1"),
        ("num_partitions=30000", "num_partitions must be between 1"),
        ("expert.data_shape=[3]", r"expert.data_shape \(3,\) does not match the data"),
        ("rules=[top-0]", "k >= 1"),
        ("rules=[]", "at least one ensemble rule"),
        ("sampler=rk4", "sampler 'rk4' is unknown"),
        ("data.std=-1", "config field 'data': std must be > 0"),
    ],
)
def test_bad_demo_config(override, match):
    with pytest.raises(ValueError, match=match):
        load(DemoConfig, "launch/demo.yaml", [override])
