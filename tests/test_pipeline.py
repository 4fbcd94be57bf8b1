"""``ddm run``: the whole pipeline with real Ray Train + DeepSpeed jobs, re-runs that skip and resume,
``ddm evaluate`` / ``ddm distill`` on what it trained, and specs that disagree with the store."""

import json
import subprocess
import sys

import pytest
import yaml

from ddm.core.config import from_dict
from ddm.launchers.spec import RunSpec, jobs
from ddm.store import Store
from tests.helpers import child_env

TINY = {
    "seed": 1,
    "ingest": {"source": "digits", "shard_size": 1000},
    "partition": {"num_partitions": 2, "num_fine": 64},
    "expert": {
        "model": {"arch": "DiT-Tiny/2", "data_shape": [1, 8, 8], "num_classes": 10},
        "steps": 6, "global_batch_size": 16, "log_every": 3, "checkpoint": {"every": 3}, "engine": {"zero_stage": 2},
    },
    "router": {
        "job": "router", "model": {"arch": "DiT-Micro/4", "data_shape": [1, 8, 8], "num_classes": 10},
        "steps": 4, "global_batch_size": 16, "checkpoint": {"every": 4}, "log_every": 2,
    },
    "monolith": True,
    "budget": {"small_batch_monolith": True, "curve_points": 2},  # the paper's split: experts at 16 / 2
    "distill_steps": 3,
    "sample": {"num_samples": 8, "steps": 2, "batch_size": 8},
    "evaluate": {"num_samples": 32, "steps": 2, "batch_size": 32, "router_t": [0.1, 0.9]},
}  # fmt: skip


def ddm(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `ddm` command in a subprocess of its own (no launcher or Ray address inherited)."""
    return subprocess.run(
        [sys.executable, "-m", "ddm.cli", *args], capture_output=True, text=True, timeout=timeout, env=child_env(env)
    )


def write_spec(tmp_path, store: str, **changes) -> str:
    spec = {**TINY, "store": store, **changes}
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_monolith_gets_the_ensembles_training_flops():
    s = from_dict(RunSpec, {**TINY, "store": "x", "router": {**TINY["router"], "steps": 40}})
    cfgs = jobs(s, 2)
    assert [c.run_dir for c in cfgs] == ["experts/00", "experts/01", "router", "monolith", "monolith-small-batch"]
    ensemble = sum(c.flops_per_step() * c.steps for c in cfgs[:3])
    mono = cfgs[3]
    assert abs(mono.flops_per_step() * mono.steps - ensemble) <= mono.flops_per_step() / 2  # rounded to a step
    # 40 steps of the DiT-Micro router cost about 2 steps of the monolith at batch 16: it gets them too.
    router_steps = cfgs[2].flops_per_step() * cfgs[2].steps / mono.flops_per_step()
    assert 1.5 < router_steps < 2.5 and mono.steps == round(6 + router_steps) == 8
    assert all(c.seed == 1 and c.store == "x" for c in cfgs)


TRAINED = ("experts/00", "experts/01", "router", "monolith", "monolith-small-batch")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """A short run (experts 6 steps); the same spec with experts at 9 steps, during which the first
    job to reach step 8 is killed with no restarts left (``ray.max_failures=0``), so that run fails;
    and the same command again, which resumes that job and finishes."""
    tmp = tmp_path_factory.mktemp("pipeline")
    store = str(tmp / "store")
    first = ddm("run", write_spec(tmp, store))
    assert first.returncode == 0, first.stderr[-4000:]
    before = {d: Store(store).child(d).manifest("export") for d in ("experts/00", "router")}
    kill = {"DDM_FAULT": "step:8", "DDM_FAULT_ONCE": str(tmp / "fault-once")}
    failed = ddm("run", write_spec(tmp, store), "expert.steps=9", "expert.ray.max_failures=0", env=kill)
    assert (tmp / "fault-once").exists(), failed.stderr[-4000:]  # the kill happened
    # What the failed run left: each job's step and its commits.
    left = {
        d: (Store(store).child(d).read_json("summary.json")["step"], committed(Store(store).child(d))) for d in TRAINED
    }
    second = ddm("run", write_spec(tmp, store), "expert.steps=9")
    assert second.returncode == 0, second.stderr[-4000:]
    return store, tmp, first, second, before, failed, left


def committed(run) -> list[int]:
    from ddm.store import layout

    return layout.committed_steps(run.child(layout.CHECKPOINTS))


def test_run_trains_assembles_samples_evaluates_and_reports(pipeline_run):
    store_url, _, first, *_ = pipeline_run
    store = Store(store_url)
    ens = store.read_json("ensemble.json")
    from ddm.store.layout import ensemble_id

    trained_dirs = ("experts/00", "experts/01", "router", "monolith", "monolith-small-batch")
    for d in (*trained_dirs, f"distilled/{ensemble_id(ens)}"):
        store.child(d).verify("export")
    # What the paper's split says was trained: experts at 16 / 2 for 6 steps (the first run), the
    # monolith at 16 for 6 (+ the router's FLOPs, under one step here), the other at 8 for 2 x 6.
    trained = {d: store.child(d).read_json("config.json") for d in ("experts/00", "monolith", "monolith-small-batch")}
    assert [(c["global_batch_size"], c["steps"]) for c in trained.values()] == [(8, 6), (16, 6), (8, 12)]
    assert ens["num_experts"] == 2 and ens["rule"] == "top-1"
    evals = [e for e in store.list("eval") if e not in ("classifier", "curves")]
    assert evals and all(e.startswith("s1-") for e in evals), evals  # the run's seed (1) drives evaluation
    assert all(s.startswith("top-1-s1-") for s in store.list("samples"))  # and sampling
    report = store.read_bytes("report/README.md").decode()
    for needle in (
        "| monolith |",
        "| top-1 |",
        "| top-2 |",
        "| full |",
        "| oracle |",
        "| distilled |",
        "![router accuracy]",
    ):
        assert needle in report, needle
    assert store.read_bytes("report/router_accuracy.png")[:4] == b"\x89PNG"
    assert "| monolith-small-batch | 1 | 8 | 8 | 18 | 18 |" in report  # the budget table after the 9-step run
    assert "## Learning curves" in report and store.read_bytes("report/curves.png")[:4] == b"\x89PNG"
    assert "experts/00" in first.stderr and "2 at a time" in first.stderr  # two 1-CPU jobs at once on 2 CPUs
    # Progress tells queued jobs from running ones: all 5 are queued, 2 start at once (2 slots), the
    # others each when the job before them in its lane is through, with their own clocks.
    said = {}  # job -> [(what, seconds of the day)]
    for line in first.stderr.splitlines():
        clock, _, rest = line.partition(" INFO ddm.progress: ")
        job, _, what = rest.partition(": ")
        if job in TRAINED and what.split(" ")[0] in ("queued", "started"):
            h, m, sec = map(int, clock.split(":"))
            said.setdefault(job, []).append((what.split(" ")[0], 3600 * h + 60 * m + sec))
    assert all([w for w, _ in said.get(d, [])] == ["queued", "started"] for d in TRAINED), said
    queued_at = min(t for events in said.values() for _, t in events)
    waited = sorted(events[1][1] - queued_at for events in said.values())
    assert waited[1] <= 1 and min(waited[2:]) >= 2, said  # the others: at least a poll (2 s) later


def test_rerun_resumes_unfinished_jobs_and_skips_finished_ones(pipeline_run):
    store_url, _, _, second, before, *_ = pipeline_run
    store = Store(store_url)
    expert = store.child("experts/00").read_json("summary.json")
    assert expert["step"] == 9 and expert["startup"]["resumed_from"] == 6  # resumed, not restarted
    assert store.child("router").manifest("export") == before["router"]  # finished: untouched
    assert "router: finished earlier" in second.stderr
    # The extended ensemble is a different ensemble: its outputs go to a new folder, the old ones stay.
    evals = [e for e in store.list("eval") if e not in ("classifier", "curves")]
    assert len(evals) == 2
    third = ddm("run", write_spec(pipeline_run[1], store_url), "expert.steps=9")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "Started a local Ray instance" not in third.stderr  # nothing to train: Ray is not even started
    assert "evaluation already in" in third.stderr
    assert "0 points measured, " in third.stderr  # every learning-curve point reused
    # Every invocation's stage times are kept: the first run's training time is not overwritten.
    history = store.read_json("report/history.json")
    assert len(history) == 3
    train = [next(s["seconds"] for s in h["stages"] if s["stage"] == "train") for h in history]
    assert train[0] > 10 and train[1] > 1 and train[2] < train[0]
    assert [s["stage"] for s in history[0]["stages"]][:3] == ["ingest", "partition", "train"]  # in stage order
    readme = store.read_bytes("report/README.md").decode()
    assert "| 1 | " in readme and "| 3 | " in readme and "every invocation" in readme


def test_learning_curves_end_at_the_final_evaluation_and_match_flops(pipeline_run):
    """The curves' last point is the final evaluation's figure (the same weights, labels and noise),
    every arm's point sits at the ensemble's FLOPs within one step, and points whose snapshots a
    longer run no longer has (experts extended from 6 to 9 steps: point 1 is now step 4) are left out."""
    store = Store(pipeline_run[0])
    results = store.read_json("report/results.json")
    final = {r["rule"]: r["distance"] for r in results["rules"]}
    series = results["curves"]["series"]
    assert set(series) == {"top-1", "monolith", "monolith-small-batch"}
    for arm, points in series.items():
        assert [p["point"] for p in points] == [2], arm  # step 4 of 9 was never snapshotted
        assert points[-1]["distance"] == pytest.approx(final[arm], rel=1e-6), arm
    one_step = 3 * 16 * results["forward_flops"]["experts"][0]  # of the monolith at batch 16
    for arm in ("monolith", "monolith-small-batch"):
        assert abs(series[arm][-1]["training_flops"] - series["top-1"][-1]["training_flops"]) <= one_step
    arms = results["arms"]
    assert arms["ensemble"]["sequential_steps"] == 9 and arms["ensemble"]["optimizer_steps"] == 18
    assert arms["monolith-small-batch"]["sequential_steps"] == arms["monolith-small-batch"]["optimizer_steps"]
    # The curves' second panel: the same points against the steps a user waits for, as trained.
    for arm, points in series.items():
        assert points[-1]["sequential_steps"] == arms["ensemble" if arm == "top-1" else arm]["sequential_steps"], arm
    assert (
        "top-1 has waited 9 sequential steps and monolith-small-batch 18 (2.00x)"
        in store.read_bytes("report/README.md").decode()
    )
    # The first run's ensemble had its curves of both points (steps 3 and 6), kept in their own folder.
    folders = [f"eval/curves/{d}" for d in store.list("eval/curves")]
    (old,) = [store.read_json(f"{d}/curves.json") for d in folders if d != results["curves"]["dir"]]
    assert all([p["point"] for p in s] == [1, 2] for s in old["series"].values())


def test_evaluate_table_counts_expert_forwards(pipeline_run):
    store_url = pipeline_run[0]
    out = ddm(
        "evaluate",
        store_url,
        "rules=[top1, top2, full, oracle, monolith]",
        "num_samples=16",
        "steps=3",
        "sampler=euler",
        "name=counts",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = Store(store_url).read_json("eval/counts/results.json")
    per_rule = {r["rule"]: r for r in results["rules"]}
    assert [r["rule"] for r in results["rules"]] == ["top-1", "top-2", "full", "oracle", "monolith"]
    assert {k: v["expert_forwards_per_sample"] for k, v in per_rule.items()} == {
        "top-1": 3,
        "top-2": 6,
        "full": 6,
        "oracle": 3,
        "monolith": 3,
    }  # fmt: skip  (K = 2: top-2 = full)
    # Sampling FLOPs: the router's forward at every evaluation beside the experts' (not for the oracle).
    from ddm.core.config import from_dict as build
    from ddm.models.config import ModelConfig, forward_flops

    fe = forward_flops(build(ModelConfig, TINY["expert"]["model"]))
    fr = forward_flops(build(ModelConfig, TINY["router"]["model"]), router=True, num_partitions=2)
    expected = {"top-1": 3 * (fe + fr), "top-2": 3 * (2 * fe + fr), "full": 3 * (2 * fe + fr), "oracle": 3 * fe,
                "monolith": 3 * fe}  # fmt: skip
    for rule, flops in expected.items():
        assert per_rule[rule]["sampling_flops_per_sample"] == pytest.approx(flops, rel=1e-12), rule
    assert per_rule["top-1"]["router_share"] == pytest.approx(fr / (fe + fr), rel=1e-12)
    assert results["forward_flops"]["router_over_expert"] == pytest.approx(fr / fe, rel=1e-12)
    # Training FLOPs of each arm: 3 x forward x batch x steps; the monolith had the ensemble's budget.
    tf = results["training_flops"]
    assert tf["ensemble"]["experts"] == [3 * fe * 8 * 9] * 2  # the paper's split: each expert at 16 / 2
    assert tf["ensemble"]["router"] == pytest.approx(3 * fr * 16 * 4, rel=1e-12)
    assert tf["monolith"]["ratio_to_ensemble"] == pytest.approx(1.0, abs=3 * fe * 16 / tf["ensemble"]["total"])
    assert all(v["distance"] > results["data_floor"] for v in per_rule.values())  # 6-step models are far from data
    assert len(results["router_accuracy"]["accuracy"]) == 10  # the default t grid
    # Classifier-free guidance evaluates two branches: every rule, the monolith too, counts both.
    cfg = ddm(
        "evaluate",
        store_url,
        "rules=[top1, monolith]",
        "num_samples=8",
        "steps=2",
        "sampler=euler",
        "guidance=2.0",
        "name=cfg",
    )
    assert cfg.returncode == 0, cfg.stderr[-3000:]
    guided = {
        r["rule"]: r["expert_forwards_per_sample"] for r in Store(store_url).read_json("eval/cfg/results.json")["rules"]
    }
    assert guided == {"top-1": 4, "monolith": 4}
    # Same name, other settings: an error, the earlier results stay.
    again = ddm("evaluate", store_url, "num_samples=20", "name=counts")
    assert again.returncode == 2 and "holds an evaluation made with other settings" in again.stderr
    assert Store(store_url).read_json("eval/counts/results.json") == results


def test_fid_without_its_library_or_weights_is_a_clear_error(pipeline_run, monkeypatch, tmp_path):
    """Both failure paths of metric=fid, whether or not pytorch-fid is installed on this machine: the
    library missing (its import blocked), and its Inception weights unreachable (offline)."""
    import types
    import urllib.error

    import torch

    from ddm.eval.evaluate import EvalConfig, evaluate

    store = Store(pipeline_run[0])
    cfg = EvalConfig(metric="fid", name="fid", num_samples=8, steps=2)
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # `import pytorch_fid...` now raises ImportError
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(
        ValueError, match=r"metric=fid needs pytorch-fid==0\.3\.0: pip install 'ddm\[fid\]'.*metric=fd_classifier"
    ):
        evaluate(store, cfg)

    from ddm.eval.metrics import FID_WEIGHTS_URL

    class Inception:  # pytorch-fid 0.3.0's: its constructor fetches the weights through its module's loader
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, blocks):
            inception.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)

    def offline(*args, **kwargs):  # torch.hub's download on a machine that cannot resolve names
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    inception = types.ModuleType("pytorch_fid.inception")
    inception.InceptionV3 = Inception
    monkeypatch.setitem(sys.modules, "pytorch_fid", types.ModuleType("pytorch_fid"))
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", inception)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached copy
    with pytest.raises(ValueError, match=r"pt_inception-2015-12-05-6726825d\.pth.*could not be fetched.*TORCH_HOME"):
        evaluate(store, cfg)
    assert not store.exists("eval/fid")  # nothing written


def test_distilled_student_belongs_to_its_teacher(pipeline_run):
    from ddm.store.layout import ensemble_id

    store = Store(pipeline_run[0])
    current = ensemble_id(store.read_json("ensemble.json"))
    students = store.list("distilled")
    assert len(students) == 2 and current in students  # one per ensemble: the first run's and the extended one's
    cfg = json.loads(store.child(f"distilled/{current}").read_verified("export", "config.json"))
    assert cfg["job"] == "distill" and cfg["partition"] is None and cfg["teacher"] == current
    metrics = [
        json.loads(line) for line in store.read_bytes(f"distilled/{current}/metrics.jsonl").decode().splitlines()
    ]
    assert metrics and all(m["loss"] > 0 for m in metrics)
    kept = [n for n in store.list("") if n.startswith("ensemble.") and n != "ensemble.json"]
    assert len(kept) == 1  # the first run's ensemble.json, kept when the extended experts were assembled


def test_a_spec_that_disagrees_with_the_store_is_refused(pipeline_run, tmp_path):
    store_url = pipeline_run[0]
    store = Store(store_url)
    before = store.read_bytes("experts/00/config.json")
    out = ddm("run", write_spec(tmp_path, store_url), "expert.steps=9", "expert.lr=0.01")
    assert out.returncode == 2
    assert "experts/00 was started with other settings (lr: 0.0001 -> 0.01)" in out.stderr
    assert store.read_bytes("experts/00/config.json") == before
    out = ddm("run", write_spec(tmp_path, store_url), "partition.num_partitions=3")
    assert out.returncode == 2 and "already holds partitions made with a different config" in out.stderr


def test_a_failed_job_fails_the_run_clearly_and_a_rerun_resumes_it(pipeline_run):
    """A job that used up its restarts (max_failures=0, killed at step 8) fails the run with exit 1
    naming it, while the other jobs finish; the same command again resumes it from its commit."""
    store_url, _, _, second, _, failed, left = pipeline_run
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "ddm run: training jobs failed: " in failed.stderr and "run the same command again" in failed.stderr
    named = failed.stderr.split("training jobs failed: ")[1].split(";")[0].split(", ")
    store = Store(store_url)
    target = {d: store.child(d).read_json("summary.json")["step"] for d in TRAINED}  # where the re-run ended
    assert len(named) == 1 and named[0] in ("experts/00", "experts/01", "monolith")  # the jobs that pass step 8
    (dead,) = named
    assert target["experts/00"] == target["experts/01"] == 9 and target["monolith-small-batch"] == 18
    assert left[dead][0] < 8 and max(left[dead][1]) == 6  # its last commit before the kill (every 3 steps)
    assert all(left[d][0] == target[d] for d in TRAINED if d != dead), (left, target)  # the others finished
    s = store.child(dead).read_json("summary.json")
    assert s["step"] == target[dead] and s["startup"]["resumed_from"] == 6  # from its commit, not from scratch
    assert f"{dead}: finished earlier" not in second.stderr and "router: finished earlier" in second.stderr
