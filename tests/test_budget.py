"""The budget arithmetic of every split (``ddm.train.budget``): batches and steps as stated, FLOPs equal
within one step, at every learning-curve point too, and the refusals named."""

import dataclasses

import pytest

from ddm.core.config import from_dict
from ddm.launchers.spec import RunSpec, jobs
from ddm.train.budget import ENSEMBLE, MONOLITH, SMALL_BATCH, BudgetConfig, arms
from ddm.train.job import JobConfig

B, S, K = 64, 300, 4
SPEC = {
    "store": "x",
    "seed": 3,
    "expert": {"model": {"arch": "DiT-Tiny/2", "data_shape": [1, 8, 8], "num_classes": 10}, "steps": S,
               "global_batch_size": B, "checkpoint": {"every": 100}},
    "router": {"job": "router", "model": {"arch": "DiT-Micro/4", "data_shape": [1, 8, 8], "num_classes": 10},
               "steps": 200, "global_batch_size": 64},
    "monolith": True,
}  # fmt: skip


def spec(**changes) -> RunSpec:
    return from_dict(RunSpec, {**SPEC, **changes})


def by_dir(cfgs: list[JobConfig]) -> dict[str, JobConfig]:
    return {c.run_dir: c for c in cfgs}


def flops(c: JobConfig, steps: int | None = None) -> float:
    return c.flops_per_step() * (c.steps if steps is None else steps)


def test_the_papers_split_divides_the_global_batch_among_the_experts():
    cfgs = by_dir(jobs(spec(budget={"small_batch_monolith": True}), K))
    experts = [cfgs[f"experts/{k:02d}"] for k in range(K)]
    assert all(e.global_batch_size == B // K and e.steps == S and e.partition == k for k, e in enumerate(experts))
    router, mono, small = cfgs["router"], cfgs["monolith"], cfgs["monolith-small-batch"]
    ensemble = sum(flops(c) for c in [*experts, router])
    # The monolith: batch B, S steps plus the router's FLOPs in its own steps; equal FLOPs within a step.
    r = flops(router) / mono.flops_per_step()
    assert mono.global_batch_size == B and mono.steps == S + round(r) and 1 <= r
    assert abs(flops(mono) - ensemble) <= mono.flops_per_step() / 2
    # The small-batch monolith: the experts' batch, K*S steps (+ the router's), K x the sequential steps.
    r_small = flops(router) / small.flops_per_step()
    assert small.global_batch_size == B // K and small.steps == K * S + round(r_small) and small.kind == "monolith"
    assert abs(flops(small) - ensemble) <= small.flops_per_step() / 2
    assert all(c.seed == 3 and c.store == "x" for c in cfgs.values())
    table = arms([(c, c.steps) for c in cfgs.values()])
    assert table[ENSEMBLE]["global_batch"] == B and table[ENSEMBLE]["per_model_batch"] == B // K
    assert table[ENSEMBLE]["optimizer_steps"] == K * S and table[ENSEMBLE]["sequential_steps"] == S  # router: 200
    assert table[MONOLITH]["sequential_steps"] == mono.steps and table[MONOLITH]["global_batch"] == B
    assert table[SMALL_BATCH]["sequential_steps"] == small.steps and table[SMALL_BATCH]["per_model_batch"] == B // K
    for arm in (MONOLITH, SMALL_BATCH):
        assert table[arm]["flops_over_ensemble"] == pytest.approx(1.0, abs=0.5 / S)


def test_ddm_0_2s_split_gives_each_expert_the_whole_batch_and_the_monolith_k_times_the_steps():
    cfgs = by_dir(jobs(spec(budget={"split": "steps"}), K))
    assert all(cfgs[f"experts/{k:02d}"].global_batch_size == B for k in range(K))
    mono = cfgs["monolith"]
    r = flops(cfgs["router"]) / mono.flops_per_step()
    assert mono.global_batch_size == B and mono.steps == K * S + round(r)
    assert "monolith-small-batch" not in cfgs


def test_auto_is_the_papers_split_with_a_monolith_and_no_split_without():
    assert jobs(spec(), K)[0].global_batch_size == B // K  # monolith: true in SPEC
    alone = jobs(spec(monolith=False), K)
    assert [c.run_dir for c in alone] == [*(f"experts/{k:02d}" for k in range(K)), "router"]
    assert all(c.global_batch_size == B for c in alone[:K])  # islands runs keep their batch
    assert jobs(spec(monolith=False, budget={"split": "batch"}), K)[0].global_batch_size == B // K


def test_a_batch_that_does_not_split_is_refused_with_the_numbers_and_the_fix():
    with pytest.raises(ValueError, match=r"64 is not a multiple of 3 x 1 x 1 = 3.*such as 63 or 66.*split=steps"):
        jobs(spec(), 3)
    two_workers = {**SPEC["expert"], "global_batch_size": 20, "ray": {"num_workers": 2}}
    with pytest.raises(ValueError, match=r"20 is not a multiple of 4 x 2 x 1 = 8.*such as 16 or 24"):
        jobs(spec(expert=two_workers), K)
    assert jobs(spec(expert={**two_workers, "global_batch_size": 24}), K)[0].global_batch_size == 6
    with pytest.raises(ValueError, match="small_batch_monolith.*needs monolith=true and budget.split=batch"):
        jobs(spec(budget={"split": "steps", "small_batch_monolith": True}), K)
    with pytest.raises(ValueError, match="budget.split must be one of"):
        BudgetConfig(split="half")


def test_curve_points_sit_at_equal_flops_in_every_arm():
    cfgs = jobs(spec(budget={"small_batch_monolith": True, "curve_points": 6}), K)
    assert all(c.checkpoint.snapshots == 6 for c in cfgs)
    d = by_dir(cfgs)
    experts = [d[f"experts/{k:02d}"] for k in range(K)]
    for i in range(6):
        ensemble = sum(flops(c, c.checkpoint.snapshot_steps(c.steps)[i]) for c in [*experts, d["router"]])
        for mono in (d["monolith"], d["monolith-small-batch"]):
            step = mono.checkpoint.snapshot_steps(mono.steps)[i]
            assert abs(flops(mono, step) - ensemble) <= mono.flops_per_step(), (i, mono.run_dir)
    assert experts[0].checkpoint.snapshot_steps(S) == [50, 100, 150, 200, 250, 300]
    assert dataclasses.replace(experts[0].checkpoint, snapshots=4).snapshot_steps(6) == [2, 3, 4, 6]  # no repeats


def test_only_a_monolith_names_its_folder():
    assert JobConfig(partition=-1, folder="monolith-small-batch").run_dir == "monolith-small-batch"
    for bad in ({"partition": 0, "folder": "monolith-x"}, {"partition": -1, "folder": "experts"}):
        with pytest.raises(ValueError, match="only a monolith"):
            JobConfig(**bad)


def test_every_crossing_of_two_curves_is_found_in_order():
    """Curves that cross twice (the ensemble ahead in the middle only) give both crossings, each
    interpolated in log FLOPs, and the report says who finishes ahead, and what each arm made a user
    wait for (sequential steps at the last point)."""
    from ddm.eval.curves import crossings_of, format_curves

    flops = [1e9, 1e10, 1e11, 1e12]
    ens = [{"point": i + 1, "training_flops": f, "distance": d, "sequential_steps": 10 * (i + 1)}
           for i, (f, d) in enumerate(zip(flops, [5, 2, 2, 3]))]  # fmt: skip
    mono = [{"point": i + 1, "training_flops": f, "distance": d, "sequential_steps": 20 * (i + 1)}
            for i, (f, d) in enumerate(zip(flops, [4, 3, 3, 2]))]  # fmt: skip
    cs = crossings_of(ens, mono, "top-1", "monolith")
    # d = ens - mono: 1, -1, -1, 1: zero halfway (in log FLOPs) between points 1-2 and points 3-4.
    assert [c["ensemble_ahead_after"] for c in cs] == [True, False]
    assert cs[0]["training_flops"] == pytest.approx(10**9.5) and cs[1]["training_flops"] == pytest.approx(10**11.5)
    assert crossings_of(ens[1:3], mono[1:3], "top-1", "monolith") == []
    text = "\n".join(format_curves({"series": {"top-1": ens, "monolith": mono}, "crossings": cs}))
    assert "cross 2 times" in text and "monolith is ahead at the end" in text
    assert "At point 4, at equal training FLOPs, top-1 has waited 40 sequential steps and monolith 80 (2.00x)" in text


def test_experts_of_different_sizes_count_their_own_flops():
    """expert_overrides give some partitions another preset (or objective); the monolith (the
    template's size) matches the sum of every job's own FLOPs; a partition that does not exist, a
    setting the budget owns and a bad value are refused, named."""
    ddpm = ["flow.path=vp", "flow.prediction=epsilon"]
    cfgs = by_dir(jobs(spec(expert_overrides={"1": ["model.arch=DiT-Micro/2"], "3": ["model.arch=DiT-S/2", *ddpm]}), K))
    experts = [cfgs[f"experts/{k:02d}"] for k in range(K)]
    assert [e.model.arch for e in experts] == ["DiT-Tiny/2", "DiT-Micro/2", "DiT-Tiny/2", "DiT-S/2"]
    assert experts[1].flops_per_step() < experts[0].flops_per_step() < experts[3].flops_per_step()
    mono = cfgs["monolith"]
    assert mono.model.arch == "DiT-Tiny/2"
    assert abs(flops(mono) - sum(flops(c) for c in [*experts, cfgs["router"]])) <= mono.flops_per_step() / 2
    assert experts[3].flow.prediction == "epsilon" and experts[0].flow.prediction == "velocity"
    assert {e.global_batch_size for e in experts} == {B // K} and {e.steps for e in experts} == {S}
    with pytest.raises(ValueError, match=r"expert_overrides names partition '4'; the partitions are 0..3"):
        jobs(spec(expert_overrides={"4": ["model.arch=DiT-S/2"]}), K)
    with pytest.raises(ValueError, match=r"expert_overrides.0: .*arch 'DiT-Huge' is unknown"):
        jobs(spec(expert_overrides={"0": ["model.arch=DiT-Huge"]}), K)
    with pytest.raises(ValueError, match=r"expert_overrides.2 sets steps=10: the run's budget sets"):
        jobs(spec(expert_overrides={"2": ["steps=10"]}), K)


def test_ddm_run_lanes_share_worker_groups_and_end_together():
    """``ddm run`` cuts its jobs into lanes (one Ray Train worker group each): per worker shape at
    most one lane per slot, longest job first into the least loaded lane; MoE jobs alone."""
    from ddm.launchers.run import lanes

    cfgs = jobs(spec(budget={"small_batch_monolith": True}), K)  # 4 experts, router, 2 monoliths
    cost = {c.run_dir: c.flops_per_step() * c.steps for c in cfgs}
    two = lanes(cfgs, 2)
    assert len(two) == 2 and sorted(c.run_dir for lane in two for c in lane) == sorted(cost)
    loads = [sum(cost[c.run_dir] for c in lane) for lane in two]
    assert max(loads) - min(loads) <= max(cost.values())  # LPT: within the largest job of each other
    assert all([cost[c.run_dir] for c in lane] == sorted((cost[c.run_dir] for c in lane), reverse=True) for lane in two)
    assert all(len(lane) == 1 for lane in lanes(cfgs, 10)) and len(lanes(cfgs, 10)) == len(cfgs)  # a slot each
    wide = dataclasses.replace(cfgs[0], ray=dataclasses.replace(cfgs[0].ray, num_workers=2))
    moe = dataclasses.replace(cfgs[1], model=dataclasses.replace(cfgs[1].model, moe=dataclasses.replace(
        cfgs[1].model.moe, num_experts=4)))  # fmt: skip
    mixed = lanes([wide, moe, *cfgs[2:]], 2)
    assert [wide] in mixed and [moe] in mixed and len(mixed) == 4  # another shape, and MoE, apart
