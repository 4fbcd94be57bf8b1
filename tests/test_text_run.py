"""``ddm run`` on text-conditioned experts: the run makes a tiny text encoder from the glyphs'
captions and keeps it in the store, stores the caption embeddings at ingest, trains the experts (a
cross-attention DiT and an MMDiT), a router that reads the captions too, the paper-split monolith
and a distilled text student (real Ray Train + DeepSpeed jobs),
samples the spec's prompts and evaluates prompt adherence; and the spec errors a text run needs."""

import json
import os

import pytest
import yaml

from ddm.core.config import from_dict
from ddm.launchers.spec import RunSpec
from ddm.store import Store
from tests.test_pipeline import ddm

PROMPTS = ["uppercase R in dejavu serif, large", "digit 3 in dejavu sans, small"]
TEXT_RUN = {
    "seed": 0,
    "ingest": {"source": "glyphs:512", "shard_size": 256, "caption": "describe"},
    "partition": {"num_partitions": 2, "num_fine": 16},
    "tiny_text_encoder": {"kind": "clip", "hidden_size": 32, "layers": 1, "heads": 2, "max_length": 24,
                          "captions": 512, "embeddings": "store"},
    "expert": {
        "model": {"arch": "DiT-Tiny/4", "data_shape": [1, 16, 16], "num_classes": 0},
        "steps": 4, "global_batch_size": 16, "log_every": 2, "checkpoint": {"every": 4},
    },
    "router": {
        "job": "router", "model": {"arch": "DiT-Micro/4", "data_shape": [1, 16, 16], "num_classes": 0},
        "steps": 2, "global_batch_size": 16, "checkpoint": {"every": 2}, "log_every": 1,
    },
    "expert_overrides": {"1": ["model.arch=MMDiT-Tiny/4"]},  # an MMDiT beside a cross-attention DiT
    "monolith": True,  # the paper's split: experts at 16 / 2, the monolith at 16
    "budget": {"curve_points": 2},
    "distill_steps": 2,
    "sample": {"num_samples": 4, "steps": 2, "batch_size": 4, "guidance": 2.0, "prompts": PROMPTS},
    "evaluate": {"rules": ["top1", "full"], "num_samples": 32, "steps": 2, "batch_size": 32, "router_t": [0.5],
                 "router_samples": 64, "guidance": 2.0},
}  # fmt: skip


def test_ddm_run_trains_and_evaluates_a_text_ensemble(tmp_path):
    store = str(tmp_path / "store")
    spec = tmp_path / "text.yaml"
    spec.write_text(yaml.safe_dump({**TEXT_RUN, "store": store}))
    out = ddm("run", str(spec))
    assert out.returncode == 0, out.stderr[-4000:]
    s = Store(store)
    encoder = "store:text_encoder"  # named inside the store: it moves with it (below)
    assert s.manifest("text_encoder")["tiny_text_encoder"]["hidden_size"] == 32
    assert s.manifest("data")["text_embeddings"]["encoder"]["spec"] == encoder  # stored at ingest
    desc = s.read_json("ensemble.json")
    assert desc["text"] == {"encoder": encoder, "dim": 32, "length": 24}
    router = json.loads(s.child("router").read_verified("export", "config.json"))
    assert router["architecture"]["family"] == "text-dit-router"  # p(k | x_t, t, caption)
    monolith = json.loads(s.child("monolith").read_verified("export", "config.json"))
    assert monolith["architecture"]["text"]["encoder"] == encoder and s.read_json("monolith/config.json")[
        "global_batch_size"] == 16  # fmt: skip
    mmdit = json.loads(s.child("experts/01").read_verified("export", "config.json"))
    assert mmdit["architecture"]["family"] == "text-mmdit" and desc["experts"][1]["dir"] == "experts/01"
    (student,) = s.list("distilled")
    cfg = json.loads(s.child(f"distilled/{student}").read_verified("export", "config.json"))
    assert cfg["architecture"]["family"] == "text-dit" and cfg["architecture"]["text"]["encoder"] == encoder
    (samples,) = s.list("samples")
    rows = json.loads(s.read_bytes(f"samples/{samples}/prompts.json"))
    assert [r["prompt"] for r in rows] == PROMPTS * 2 and all(r["guidance"] == 2.0 for r in rows)
    (name,) = [n for n in s.list("eval") if n not in ("classifier", "curves")]
    report = s.read_json(f"eval/{name}/results.json")
    by_rule = {r["rule"]: r for r in report["rules"]}
    assert set(by_rule) == {"top-1", "full", "monolith", "distilled"}
    assert all(0.0 <= r["prompt_adherence"] <= 1.0 for r in by_rule.values())
    curves = s.read_json("report/results.json")["curves"]["series"]
    assert set(curves) == {"top-1", "monolith"} and all(len(points) == 2 for points in curves.values())
    assert all(0 <= p["prompt_adherence"] <= 1 and p["adherence_chance"] > 0 for ps in curves.values() for p in ps)
    assert all(0 <= p["prompt_retrieval"] <= 1 and p["retrieval_chance"] == 0.1 for ps in curves.values() for p in ps)
    readme = open(os.path.join(store, "report", "README.md")).read()
    assert f"1. {PROMPTS[0]} (guidance 2)" in readme and "Prompt adherence" in readme
    assert "In brackets: prompt retrieval (chance 0.100), then the class adherence" in readme
    assert "Prompt retrieval (a sample's own prompt found among 10" in readme
    again = ddm("run", str(spec))  # everything is done: nothing trains again
    assert again.returncode == 0, again.stderr[-4000:]
    assert "finished earlier" in again.stderr and "making a tiny" not in again.stderr
    moved = str(tmp_path / "moved")  # the store at another URL, the old one gone: it samples from its new place
    os.rename(store, moved)
    from ddm.ensemble.sample import sample
    from ddm.ensemble.settings import SampleConfig

    sample(Store(moved), SampleConfig(num_samples=2, steps=2, batch_size=2, prompts=[PROMPTS[1]], name="moved"))
    assert [r["prompt"] for r in json.loads(Store(moved).read_bytes("samples/moved/prompts.json"))] == [PROMPTS[1]] * 2


@pytest.mark.parametrize(
    "change,match",
    [
        ({"ingest": {"source": "glyphs:64"}}, "ingest reads no captions: set ingest.caption"),
        ({"sample": {"num_samples": 4}}, r"give the sample stage its prompts \(sample.prompts"),
        ({"expert": {**TEXT_RUN["expert"], "model": {**TEXT_RUN["expert"]["model"], "text": {"encoder": "/m", "dim": 8,
                                                                                              "length": 8}}}},
         "both name the experts' text encoder: keep one"),
        ({"tiny_text_encoder": {"kind": "bert"}}, "kind must be clip or t5"),
        ({"budget": {"curve_points": 2, "curve_rules": ["top1", "oracle"]},
          "evaluate": {**TEXT_RUN["evaluate"], "held_out": "glyphs:16"}}, "drop oracle from budget.curve_rules"),
    ],
)  # fmt: skip
def test_text_run_specs_say_what_is_missing(change, match):
    with pytest.raises(ValueError, match=match):
        from_dict(RunSpec, {**TEXT_RUN, "store": "x", **change})


def test_the_router_reads_the_experts_captions_and_ingest_stores_them():
    spec = from_dict(RunSpec, {**TEXT_RUN, "store": "/runs/t"}).resolved()
    text = spec.expert.model.text
    assert (text.encoder, text.dim, text.length) == ("store:text_encoder", 32, 24)  # in the store, wherever it is
    assert spec.router.model.text == text
    assert (spec.ingest.text_encoder, spec.ingest.text_length) == ("store:text_encoder", 24)


def test_a_store_of_the_first_text_runs_keeps_its_encoders_absolute_name():
    """Stores made before tiny encoders were named store:text_encoder name it by the store's URL; a
    spec that says so (expert.model.text.encoder) continues them instead of being refused."""
    old = {
        **TEXT_RUN["expert"],
        "model": {**TEXT_RUN["expert"]["model"], "text": {"encoder": "/runs/t/text_encoder", "dim": 32, "length": 24}},
    }
    spec = from_dict(RunSpec, {**TEXT_RUN, "store": "/runs/t", "expert": old}).resolved()
    assert spec.expert.model.text.encoder == spec.router.model.text.encoder == "/runs/t/text_encoder"
    assert spec.ingest.text_encoder == "/runs/t/text_encoder" and spec.expert.model.text.dim == 32
    with pytest.raises(ValueError, match="both name the experts' text encoder"):
        from_dict(RunSpec, {**TEXT_RUN, "store": "/runs/other", "expert": old})


def test_the_glyphs_text_spec_loads_with_held_out_prompts():
    from ddm.core.config import load

    spec = load(RunSpec, "launch/glyphs_text.yaml", ["store=/runs/gt"]).resolved()
    assert spec.router.model.text == spec.expert.model.text
    assert spec.expert.model.text.encoder == "store:text_encoder"
    assert spec.evaluate.held_out == "glyphs:1000" and spec.evaluate.held_out_seed != spec.ingest.seed
    assert len(spec.sample.prompts) == 8 and spec.monolith and spec.budget.split == "batch"


def test_islands_plan_text_experts_with_the_stores_tiny_encoder():
    """``ddm submit`` resolves a text spec against the islands' store: every expert and the router
    read the tiny encoder kept there, and ingest stores the embeddings the experts read."""
    from ddm.launchers.plan import Island, IslandsConfig, plan_jobs

    islands = IslandsConfig(store="s3://b/r", islands={"a": Island("http://a:1"), "b": Island("http://b:1")})
    spec = from_dict(RunSpec, {**TEXT_RUN, "store": "ignored"}).resolved(islands.store)
    jobs = plan_jobs(spec, islands, [300, 212])
    assert [j.name for j in jobs] == ["expert-00", "expert-01", "router"]
    for j in jobs:
        t = j.config.model.text
        assert (t.encoder, t.dim, t.length, t.embeddings) == ("store:text_encoder", 32, 24, "store"), j.name
    assert jobs[1].config.model.arch == "MMDiT-Tiny/4" and spec.ingest.text_encoder == "store:text_encoder"
