"""Tiers 4 and 5: real DeepSpeed (CPU, gloo) with and without Ray Train; exact resume; faults.

Single-process runs go through ``python -m ddm.train`` in a subprocess (a fresh process
group each time, as a user's command would). Ray runs use a real local Ray runtime with 2 workers.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddm.data.ingest import IngestConfig, ingest
from ddm.data.partition import PartitionConfig, partition
from ddm.models.build import build_model
from ddm.models.config import ModelConfig
from ddm.models.pretrained import init_from
from ddm.store import Store
from tests.helpers import assert_same_weights, child_env, diffusers_dit, exported, partitioned_digits, summary

TRAIN = ["partition=0", "global_batch_size=16", "log_every=2", "seed=3", "model.class_dropout_prob=0.1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A local store with digits ingested and split into 2 partitions; copied per test."""
    return partitioned_digits(tmp_path_factory.mktemp("prepared") / "store")


def fresh(prepared, tmp_path, name="run") -> str:
    dst = tmp_path / name
    shutil.copytree(prepared, dst)
    return str(dst)


def run_cli(store: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m ddm.train`` on ``store``; with the test process's share of threads (conftest)."""
    threads = [f"threads={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    cmd = [sys.executable, "-m", "ddm.train", f"store={store}", *TRAIN, *threads, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env(env))


# --- one process, no Ray --------------------------------------------------------------------


def test_killed_run_resumes_to_the_uninterrupted_weights(prepared, tmp_path):
    straight = fresh(prepared, tmp_path, "straight")
    s = summary(run_cli(straight, "steps=8", "checkpoint.every=4"))
    assert s["step"] == 8 and s["startup"]["resumed_from"] is None

    crashed = fresh(prepared, tmp_path, "crashed")
    scratch = tmp_path / "scratch"  # where checkpoint snapshots are staged (default: /dev/shm)
    scratch.mkdir()
    env = {"DDM_FAULT": "step:6", "DDM_FAULT_ONCE": str(tmp_path / "fault-once"), "DDM_SCRATCH_DIR": str(scratch)}
    out = run_cli(crashed, "steps=8", "checkpoint.every=4", env=env)
    assert out.returncode == -9  # SIGKILL at step 6, after step 4 was committed
    assert [p.name for p in scratch.iterdir() if p.name.startswith("ddm-ckpt-")]  # a kill cleans nothing
    s2 = summary(run_cli(crashed, "steps=8", "checkpoint.every=4", env={"DDM_SCRATCH_DIR": str(scratch)}))
    assert s2["startup"]["resumed_from"] == 4
    assert not list(scratch.iterdir())  # the killed run's scratch was swept, the finished run's removed
    assert_same_weights(exported(straight), exported(crashed))
    # The metrics continue the same loss curve.
    m1 = [json.loads(line) for line in open(os.path.join(straight, "experts/00/metrics.jsonl"))]
    m2 = [json.loads(line) for line in open(os.path.join(crashed, "experts/00/metrics.jsonl"))]
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [2, 4, 6, 8]
    assert [round(m["loss"], 5) for m in m1] == [round(m["loss"], 5) for m in m2]
    # TensorBoard (its own reader) shows the same curve: the killed attempt's step 6 was dropped at
    # the resumed run's session start, so every step appears once.
    for run, m in ((straight, m1), (crashed, m2)):
        board = tensorboard_scalars(os.path.join(run, "experts/00/tensorboard"))
        assert [(e.step, round(e.value, 5)) for e in board["train/loss"]] == [
            (x["step"], round(x["loss"], 5)) for x in m
        ]
        assert [e.step for e in board["train/steps_per_s"]] == [2, 4, 6, 8]


def tensorboard_scalars(logdir: str) -> dict:
    """Scalars as TensorBoard reads a log directory (any URL its file system layer reads)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, purge_orphaned_data=True)
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_crash_inside_an_upload_never_commits_a_partial_checkpoint(prepared, tmp_path):
    store = fresh(prepared, tmp_path)
    env = {"DDM_FAULT": "upload:8", "DDM_FAULT_ONCE": str(tmp_path / "fault-once")}
    out = run_cli(store, "steps=8", "checkpoint.every=4", env=env)
    assert out.returncode == -9
    ckpts = Store(store).child("experts/00/checkpoints")
    assert ckpts.is_committed("step_0000004") and not ckpts.is_committed("step_0000008")
    assert ckpts.list("step_0000008")  # the partial upload is there, uncommitted
    s = summary(run_cli(store, "steps=8", "checkpoint.every=4"))
    assert s["startup"]["resumed_from"] == 4 and s["step"] == 8
    assert ckpts.is_committed("step_0000008")


def _flip_a_byte(ckpt_dir: str) -> str:
    target = "portable/rank000.safetensors"  # the weights and Adam's moments
    raw = bytearray(open(os.path.join(ckpt_dir, target), "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(os.path.join(ckpt_dir, target), "wb").write(bytes(raw))
    return f"{target} is corrupted"


def _truncate_the_manifest(ckpt_dir: str) -> str:
    path = os.path.join(ckpt_dir, "MANIFEST.json")
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    return "MANIFEST.json is not a valid manifest"


def _delete_a_file(ckpt_dir: str) -> str:
    os.remove(os.path.join(ckpt_dir, "rank000.json"))
    return "rank000.json is listed in the manifest but missing"


def _undeserializable_rank_state(ckpt_dir: str) -> str:
    """Garbage whose size and sha256 the manifest records: it passes the checksums, then fails to load."""
    import hashlib

    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00not json"
    open(os.path.join(ckpt_dir, "rank000.safetensors"), "wb").write(garbage)
    path = os.path.join(ckpt_dir, "MANIFEST.json")
    manifest = json.load(open(path))
    manifest["files"]["rank000.safetensors"] = {"size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
    json.dump(manifest, open(path, "w"))
    return "SafetensorError"


@pytest.fixture(scope="module")
def two_commits(prepared, tmp_path_factory) -> str:
    """A job trained 8 steps with commits at steps 4 and 8 (copied per test)."""
    store = fresh(prepared, tmp_path_factory.mktemp("two-commits"))
    summary(run_cli(store, "steps=8", "checkpoint.every=4"))
    return store


@pytest.mark.parametrize(
    "damage",
    [
        _flip_a_byte,
        _truncate_the_manifest,
        _undeserializable_rank_state,
        pytest.param(_delete_a_file, marks=pytest.mark.slow),  # the store's own tests cover missing files
    ],
)
def test_an_unreadable_newest_commit_falls_back_to_the_one_before(two_commits, tmp_path, damage):
    store = fresh(two_commits, tmp_path)
    reason = damage(os.path.join(store, "experts/00/checkpoints/step_0000008"))
    out = run_cli(store, "steps=10", "checkpoint.every=4")
    s = summary(out)
    assert s["startup"]["resumed_from"] == 4 and s["step"] == 10
    assert "step_0000008 is unusable" in out.stderr and reason in out.stderr


def test_with_no_usable_commit_the_job_starts_over_and_says_so(two_commits, tmp_path):
    store = fresh(two_commits, tmp_path)
    for step in ("step_0000004", "step_0000008"):
        _truncate_the_manifest(os.path.join(store, "experts/00/checkpoints", step))
    out = run_cli(store, "steps=8", "checkpoint.every=4")
    s = summary(out)
    assert s["startup"]["resumed_from"] is None and s["step"] == 8
    assert "none of the 2 commits" in out.stderr and "starts over" in out.stderr


def test_an_unreadable_export_counts_as_unfinished_and_is_written_again(two_commits, tmp_path):
    from ddm.core.config import load
    from ddm.train.job import JobConfig, is_finished

    store = fresh(two_commits, tmp_path)
    cfg = load(JobConfig, None, [f"store={store}", *TRAIN, "steps=8", "checkpoint.every=4"])
    assert is_finished(cfg)
    _truncate_the_manifest(os.path.join(store, "experts/00/export"))
    assert not is_finished(cfg)  # `ddm run` would run the job again
    s = summary(run_cli(store, "steps=8", "checkpoint.every=4"))
    assert s["startup"]["resumed_from"] == 8 and is_finished(cfg)  # nothing retrained, the export rewritten


def test_zero3_shards_the_ema_trains_and_resumes(prepared, tmp_path):
    """ZeRO-3 on 2 ranks: each rank averages only its half of every parameter (from its own shards,
    no gather in the step); the export, gathered to rank 0, equals a ZeRO-2 run's, whose EMA is
    whole on every rank (to float error: the stages reduce in other orders); a run stopped at
    step 2 resumes to the uninterrupted run's weights exactly."""
    z3 = ("engine.zero_stage=3", "checkpoint.every=2")
    straight, resumed, zero2 = (fresh(prepared, tmp_path, name) for name in ("a", "b", "c"))
    sharded = on_ranks("ddm.train", straight, 2, "steps=4", *z3)
    on_ranks("ddm.train", resumed, 2, "steps=2", *z3)
    assert on_ranks("ddm.train", resumed, 2, "steps=4", *z3)["startup"]["resumed_from"] == 2
    assert_same_weights(exported(straight), exported(resumed))
    whole = on_ranks("ddm.train", zero2, 2, "steps=4", "engine.zero_stage=2", "checkpoint.every=2")
    a, b = exported(straight), exported(zero2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Rank 0 holds ceil(n / 2) elements of each parameter of n: half the model, plus padding.
    assert whole["ema_elements"] / 2 <= sharded["ema_elements"] <= whole["ema_elements"] / 2 + len(a)


def test_a_job_starts_from_another_jobs_export(prepared, tmp_path):
    """init_from: an expert fine-tuned from the monolith starts at the monolith's weights (after one
    step at a learning rate of 1e-12, its EMA export still equals them), and says where they came
    from; a model the export does not fit is refused before anything is trained, naming tensors."""
    store = fresh(prepared, tmp_path)
    summary(run_cli(store, "partition=-1", "steps=2", "checkpoint.every=2"))  # the monolith
    s = summary(run_cli(store, "partition=1", "steps=1", "checkpoint.every=1", "lr=1e-12", "init_from=monolith"))
    assert_same_weights(exported(store, "monolith"), exported(store, "experts/01"))
    source = Store(store).child("monolith").manifest("export")["files"]["model.safetensors"]["sha256"]
    config = json.load(open(os.path.join(store, "experts/01/export/config.json")))
    assert config["init_from"] == s["init_from"] == {"url": f"{store}/monolith", "sha256": source}
    out = run_cli(store, "partition=0", "steps=1", "model.arch=DiT-Micro/4", "init_from=monolith")
    assert out.returncode == 2 and "init_from=monolith: its weights do not fit this job's model" in out.stderr
    assert "of another shape (e.g. " in out.stderr and not os.path.exists(os.path.join(store, "experts/00"))
    # A diffusers DiT (its mapping proven against diffusers in test_pretrained.py) starts a job alike.
    diffusers_dit(tmp_path / "diffusers-dit")
    out = run_cli(store, "partition=0", "steps=1", f"init_from={tmp_path}/diffusers-dit")
    assert out.returncode == 2 and "set model.time_freq_shift=1 for this job" in out.stderr
    s = summary(run_cli(store, "partition=0", "steps=1", "checkpoint.every=1", "lr=1e-12", "model.time_freq_shift=1",
                        f"init_from={tmp_path}/diffusers-dit"))  # fmt: skip
    want = build_model(ModelConfig("DiT-Tiny/2", (1, 8, 8), num_classes=10, time_freq_shift=1))
    init_from(want, f"{tmp_path}/diffusers-dit", Store(store))
    assert_same_weights(exported(store, "experts/00"), want.state_dict())
    assert (
        s["init_from"]["format"] == "diffusers DiTTransformer2DModel" and "learned sigma" in s["init_from"]["notes"][-1]
    )


def test_each_rank_of_expert_parallelism_takes_its_own_experts_from_an_export():
    from ddm.models.pretrained import rank_experts

    e = "blocks.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts"
    export = {f"{e}.{i}.fc1.weight": torch.full((1,), float(i)) for i in range(4)} | {"x.weight": torch.ones(1)}
    rank1 = rank_experts(export, 2, 2)  # the second of 2 ranks holds experts 2 and 3, numbered 0 and 1
    assert sorted(rank1) == [f"{e}.0.fc1.weight", f"{e}.1.fc1.weight", "x.weight"]
    assert [rank1[f"{e}.{i}.fc1.weight"].item() for i in (0, 1)] == [2.0, 3.0]


def test_keeps_only_the_last_checkpoints(prepared, tmp_path):
    store = fresh(prepared, tmp_path)
    s = summary(
        run_cli(
            store, "steps=8", "checkpoint.every=2", "checkpoint.keep=2", "grad_accum=2", "checkpoint.export_every=4",
            "threads=1",
        )
    )  # fmt: skip
    ckpts = Store(store).child("experts/00/checkpoints")
    assert ckpts.list("") == ["step_0000006", "step_0000008"]
    assert s["threads"] == 1  # the setting for jobs side by side without Ray


def test_threads_follow_the_cpus_a_job_is_given(monkeypatch):
    from ddm.core.config import load
    from ddm.train.job import JobConfig
    from ddm.train.trainer import threads_for

    cfg = load(JobConfig, None, ["store=x"])
    monkeypatch.delenv("DDM_RAY_CPUS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine share its CPUs
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    assert threads_for(cfg) == 3 and threads_for(load(JobConfig, None, ["store=x", "threads=1"])) == 1
    monkeypatch.setenv("DDM_RAY_CPUS", "4")  # a Ray Train worker: the CPUs Ray reserved for it
    assert threads_for(cfg) == 4
    with pytest.raises(ValueError, match="ray.cpus_per_worker=4"):
        threads_for(load(JobConfig, None, ["store=x", "threads=8"]))


def test_deepspeed_config_from_train_config():
    from ddm.core.config import load
    from ddm.train.engine import deepspeed_config
    from ddm.train.job import JobConfig

    raw = "engine.deepspeed={zero_optimization: {reduce_bucket_size: 1000}, gradient_clipping: 1.0}"
    cfg = load(
        JobConfig, None, ["global_batch_size=64", "grad_accum=2", "ray.num_workers=4", "engine.zero_stage=1", raw]
    )
    ds = deepspeed_config(cfg, on_gpu=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        8,
        2,
    )
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}  # raw settings merge, not replace
    assert ds["gradient_clipping"] == 1.0 and ds["torch_autocast"]["enabled"] is False
    # auto: bf16 on a GPU, with every gradient reduced in fp32 (engine.reduce_dtype) ...
    fp32_sums = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert deepspeed_config(cfg, on_gpu=True)["torch_autocast"] == fp32_sums
    # ... or Linear/Conv gradients in bf16, DeepSpeed's own default, when asked.
    bf16_sums = load(JobConfig, None, ["store=/s", "engine.reduce_dtype=bf16"])
    assert deepspeed_config(bf16_sums, on_gpu=True)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds  # never DeepSpeed's bf16 mode: it casts the weights


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["global_batch_size=10", "grad_accum=4"], "is not divisible by grad_accum=4"),
        (["partition=5"], r"partition 5 does not exist: .* has partitions 0..1"),
        (["model.data_shape=[1,16,16]"], r"does not match the dataset's samples \(1, 8, 8\)"),
        (["model.moe.num_experts=4", "model.moe.ep_size=3"], "must divide num_experts"),
        (["model.moe.num_experts=4", "model.moe.ep_size=2"], "ep_size=2 must divide ray.num_workers=1"),
        (["ray.gpus_per_worker=0"], "gpus_per_worker must be > 0"),
        (["engine.precision=fp16"], "precision must be auto, fp32 or bf16"),
    ],
)
def test_bad_input_fails_before_training(prepared, tmp_path, overrides, match):
    from ddm.core.config import load
    from ddm.train.job import JobConfig, check_inputs

    with pytest.raises(ValueError, match=match):
        check_inputs(load(JobConfig, None, [f"store={fresh(prepared, tmp_path)}", *TRAIN, *overrides]))


# --- Ray Train + DeepSpeed, 2 workers --------------------------------------------------------


def test_ray_train_settings_fill_in_and_never_override(monkeypatch):
    from ddm.distributed.ray_runtime import LOCAL_TRAIN_ENV, TRAIN_ENV, train_env

    for k in (*TRAIN_ENV, *LOCAL_TRAIN_ENV):
        monkeypatch.delenv(k, raising=False)  # restored by monkeypatch after the test
    train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ  # a cluster keeps its preemption watcher
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's setting wins
    train_env(local=True)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0" and os.environ["RAY_TRAIN_METRICS_ENABLED"] == "0"


def test_the_trims_switch_reaches_the_workers(monkeypatch, tmp_path):
    """Ray's worker processes have the runtime's environment, not the command's: ``DDM_STARTUP_TRIMS``
    travels in the workers' env (which ``_worker`` applies before DeepSpeed is imported)."""
    import ddm.distributed.ray_runtime
    from ddm.core.config import load
    from ddm.launchers import ray_job
    from ddm.train.job import JobConfig

    given = []

    class Recorder:  # stands in for Ray Train's trainer: what reaches it is what the workers get
        def __init__(self, train_loop_config, **kwargs):
            given.append(train_loop_config)

        def fit(self):
            return None

    monkeypatch.setattr(ddm.distributed.ray_runtime, "trainer_class", lambda: Recorder)
    cfg = load(JobConfig, None, [f"store={tmp_path}", "partition=0"])
    monkeypatch.setenv("DDM_STARTUP_TRIMS", "0")
    ray_job._fit(cfg, None, ray_job._worker, {"cfg": cfg, "env": {"DDM_FAULT": "x"}})
    monkeypatch.delenv("DDM_STARTUP_TRIMS")
    ray_job._fit(cfg, None, ray_job._worker, {"cfg": cfg, "env": {}})
    assert [g["env"] for g in given] == [{"DDM_STARTUP_TRIMS": "0", "DDM_FAULT": "x"}, {}]


def test_ray_train_runs_without_a_dataset_manager_only_when_it_has_no_datasets(monkeypatch):
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks import BackendSetupCallback, DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from ddm.distributed.ray_runtime import trainer_class

    def kinds(**datasets):
        trainer = trainer_class()(lambda c: None, scaling_config=ScalingConfig(num_workers=2), datasets=datasets)
        return {type(c) for c in trainer._create_default_callbacks()}

    assert BackendSetupCallback in kinds() and DatasetsCallback not in kinds()
    assert PlacementGroupCleanerCallback not in kinds() | kinds(x=lambda: None)
    assert DatasetsCallback in kinds(x=lambda: None)  # a run with Ray Datasets keeps its DatasetManager
    monkeypatch.setenv("DDM_STARTUP_TRIMS", "0")
    assert {DatasetsCallback, PlacementGroupCleanerCallback} <= kinds()


def test_muon_kernels_are_compiled_at_their_first_call_not_at_import():
    code = """
import sys, torch
from ddm.distributed.parallel import ensure_process_group, load_deepspeed
ensure_process_group()
load_deepspeed().init_distributed("gloo")
from deepspeed.runtime import engine
from deepspeed.runtime.zero.muon import original_muon as muon
p = [torch.nn.Parameter(torch.zeros(2))]
print(engine.is_zero_supported_optimizer(torch.optim.AdamW(p)), engine.is_zero_supported_optimizer(torch.optim.SGD(p)))
print("torch._inductor.compile_fx" in sys.modules)
compiled = []
torch.compile = lambda fn, **kw: compiled.append(fn.__name__) or fn  # records what the first call compiles
g = torch.randn(6, 4, dtype=torch.float64)
out = [muon.zeropower_via_newtonschulz5(g, 5), muon.zeropower_via_newtonschulz5(g, 5)]
print(compiled, all(torch.equal(o, muon.zeropower_via_newtonschulz5.__wrapped__(g, 5)) for o in out))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env())
    lines = out.stdout.strip().splitlines()[-3:]
    assert lines[0] == "True False"  # DeepSpeed's own ZeRO check, answered as before
    assert lines[1] == "False"  # Muon imported without torch's compiler
    assert lines[2] == "['zeropower_via_newtonschulz5'] True"  # compiled once, at its first call, same maths


@pytest.fixture(scope="module")
def ray_runtime():
    import ray

    from ddm.distributed.ray_runtime import train_env

    train_env(local=True)  # ddm's Ray Train settings for a local runtime, as `ddm train` uses
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_cfg(store: str, *overrides: str):
    from ddm.core.config import load
    from ddm.train.job import JobConfig

    return load(JobConfig, None, [f"store={store}", *TRAIN, "ray.num_workers=2", "ray.max_failures=2", *overrides])


def ray_train(cfg, env: dict | None = None) -> dict:
    """What `ddm train expert` does on a Ray cluster: resolve, check once, run the Ray Train job."""
    from ddm.launchers.ray_job import run_job
    from ddm.train.job import check_inputs, resolve

    cfg = resolve(cfg)
    check_inputs(cfg)
    return run_job(cfg, env=env)


@pytest.fixture(scope="module")
def zero2_run(prepared, tmp_path_factory, ray_runtime):

    store = fresh(prepared, tmp_path_factory.mktemp("zero2"))
    return store, ray_train(ray_cfg(store, "steps=6", "checkpoint.every=2", "engine.zero_stage=2"))


def test_ray_two_workers_zero2(zero2_run):
    store, s = zero2_run
    assert s["world_size"] == 2 and s["step"] == 6 and s["threads"] == 1  # ray.cpus_per_worker=1
    assert s["dense_max_diff_across_ranks"] == 0.0  # data-parallel replicas stay identical
    # Ray recorded the job's progress: its last report is the final step, loss and commit.
    reported = s["ray_reported"]
    assert reported["step"] == 6 and reported["loss"] == s["final_loss"] and reported["steps_per_s"] > 0
    assert reported["checkpoint"].endswith("experts/00/checkpoints/step_0000006")
    manifest = Store(store).child("experts/00/checkpoints").manifest("step_0000006")
    names = manifest["files"]
    assert "rank000.safetensors" in names and "rank001.safetensors" in names
    # Each rank's pieces of the weights and Adam's moments, as safetensors; no DeepSpeed pickle.
    assert {"portable/rank000.safetensors", "portable/rank001.safetensors"} <= set(names)
    assert not any(n.endswith(".pt") for n in names)


def test_ray_restarts_a_killed_worker_and_resumes(prepared, tmp_path, zero2_run):
    """A lane of ``ddm run`` (jobs one after another on one Ray Train worker group): expert 1
    trains, then expert 0's rank 0 is killed at step 5; Ray restarts the lane, whose workers skip
    expert 1 (exported) and resume expert 0 from its commit at step 4 to the weights of the same job
    run alone and uninterrupted (so nothing of expert 1 leaked into it); the monolith, whose lease
    another holder has, is left out and said so."""
    from ddm.launchers.ray_job import run_lane
    from ddm.store.lease import holding
    from ddm.train.job import check_inputs, resolve

    store = fresh(prepared, tmp_path)
    env = {"DDM_FAULT": "step:5:0", "DDM_FAULT_ONCE": str(tmp_path / "fault-once")}  # kill rank 0 at step 5
    lane = [
        ray_cfg(store, "partition=1", "steps=2", "checkpoint.every=2"),
        ray_cfg(store, "steps=6", "checkpoint.every=2", "engine.zero_stage=2"),
        ray_cfg(store, "partition=-1", "steps=2"),
    ]
    lane = [resolve(c) for c in lane]
    for c in lane:
        check_inputs(c)
    with holding(Store(store), "monolith", "another writer"):
        first, second, third = run_lane(lane, env=env)
    assert os.path.exists(tmp_path / "fault-once")  # the kill happened
    assert first["step"] == 2 and first["startup"]["resumed_from"] is None  # trained once, skipped after
    assert second["startup"]["resumed_from"] == 4 and second["step"] == 6
    assert_same_weights(exported(zero2_run[0]), exported(store))
    assert "another writer" in third["refused"] and not os.path.exists(os.path.join(store, "monolith", "export"))


MOE = [
    "checkpoint.every=2",
    "engine.zero_stage=1",
    "model.moe.num_experts=4",
    "model.moe.ep_size=2",
    "model.moe.every=1",
]


def test_ray_moe_expert_parallel(prepared, tmp_path, ray_runtime):
    import dataclasses

    from ddm.models.build import build_model

    store = fresh(prepared, tmp_path)
    cfg = ray_cfg(store, "steps=4", *MOE)
    s = ray_train(cfg)
    assert s["dense_max_diff_across_ranks"] == 0.0
    assert s["expert_weights_differ_across_ranks"] is True
    # The export holds all 4 MoE experts of every MoE block and loads into a one-process model.
    weights = exported(store)
    expert_keys = [k for k in weights if ".deepspeed_experts." in k]
    assert {k.split(".deepspeed_experts.")[1].split(".")[0] for k in expert_keys} == {"0", "1", "2", "3"}
    one_process = dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, ep_size=1))
    missing, unexpected = build_model(one_process).load_state_dict(weights, strict=False)
    assert not unexpected and not missing
    w = {
        k: v
        for k, v in weights.items()
        if "blocks.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts." in k and k.endswith("fc1.weight")
    }
    assert len(w) == 4 and not torch.equal(w[sorted(w)[0]], w[sorted(w)[-1]])

    # Save/load round trip: resuming from step 4 reaches the weights of a straight 6-step run, which
    # needs every rank's MoE experts, dense weights, optimizer state and EMA back exactly. Both run
    # on 2 ranks as torchrun starts them (the training function without Ray; one thread a rank, as
    # the Ray workers had): the Ray-made commit resumes under another launcher.
    plain = ["steps=6", *MOE]
    s2 = on_ranks("ddm.train", store, 2, *plain)
    assert s2["startup"]["resumed_from"] == 4 and s2["world_size"] == 2
    straight = fresh(prepared, tmp_path, "straight")
    on_ranks("ddm.train", straight, 2, *plain)
    assert_same_weights(exported(straight), exported(store))

    # init_from under expert parallelism: each rank takes its own experts from the export (which holds
    # all 4): after one step at a learning rate of 1e-12, the new job's export equals its source.
    started = fresh(prepared, tmp_path, "started")
    s3 = on_ranks("ddm.train", started, 2, *MOE, "partition=1", "steps=1", "lr=1e-12", f"init_from={store}/experts/00")
    assert s3["init_from"]["url"] == f"{store}/experts/00"
    assert_same_weights(exported(started, "experts/01"), exported(store))


def test_ray_rejects_bad_input_before_any_worker(prepared, tmp_path, ray_runtime):

    with pytest.raises(ValueError, match="global_batch_size=15 is not divisible"):
        ray_train(ray_cfg(fresh(prepared, tmp_path), "global_batch_size=15"))
    with pytest.raises(ValueError, match="threads=2 but each worker gets ray.cpus_per_worker=1"):
        ray_train(ray_cfg(fresh(prepared, tmp_path, "threads"), "threads=2"))


# --- the S3 endpoint goes away mid-run --------------------------------------------------------


def test_s3_outage_fails_clearly_then_resumes(tmp_path, s3_endpoint):
    """Stop the S3 server while a run is about to checkpoint: bounded retries, a clear failure,
    nothing committed is lost; with the endpoint back, the same command resumes and finishes."""
    import socket
    import time

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT": endpoint,  # TensorBoard's own S3 client reads its endpoint from here
        # 2 attempts per operation with 0.05 s of backoff (default: 4, 3.5 s): the same bounded
        # failure, without half a minute of retries against a closed port.
        "DDM_STORE_RETRIES": "1",
        "DDM_STORE_BACKOFF_S": "0.05",
    }
    url = "s3://ddm-test/outage"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = Store(url, skip_instance_cache=True)
        ingest(IngestConfig(shard_size=1000), store)
        partition(PartitionConfig(num_partitions=2, num_fine=64), store)
        marker = tmp_path / "paused"
        fault = {"DDM_FAULT": "step:8", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": str(marker)}
        cmd = [sys.executable, "-m", "ddm.train", f"store={url}", *TRAIN, "steps=12", "checkpoint.every=4"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env({**env, **fault})
        )
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the run never reached step 8:\n{proc.communicate()[1][-3000:]}")
            time.sleep(0.1)
        server.stop()  # the endpoint disappears just before the step-8 checkpoint
        (tmp_path / "paused.go").touch()
        out, err = proc.communicate(timeout=240)
        assert proc.returncode != 0
        assert "StoreError" in err and "Check that the store is reachable" in err

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # same data (moto keeps it)
        server.start()
        ckpts = Store(f"{url}/experts/00/checkpoints", skip_instance_cache=True)
        assert ckpts.is_committed("step_0000004")  # nothing committed was lost
        s = summary(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env(env)))
        assert s["startup"]["resumed_from"] == 4 and s["step"] == 12
        # `tensorboard --logdir` on the store URL: TensorBoard reads the job's event files from S3
        # itself, one curve, each step once (the lost attempt's step 6 dropped at the resume).
        board = tensorboard_scalars(f"{url}/experts/00/tensorboard")
        assert [e.step for e in board["train/loss"]] == [2, 4, 6, 8, 10, 12]
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_router_job_learns_the_partitions(prepared, tmp_path):
    """The router is a job like an expert's: cross-entropy of the partition on noised data."""
    from ddm.data.reader import PartitionReader
    from ddm.models.build import build_router
    from ddm.models.config import ModelConfig

    store = fresh(prepared, tmp_path)
    # Unconditional, so the image is the only evidence: with the digit class given, the partition
    # (semantic, so close to a function of the class) would be guessable even from pure noise.
    s = summary(
        run_cli(
            store,
            "job=router",
            "model.num_classes=0",
            "steps=600",
            "lr=0.002",
            "global_batch_size=32",
            "checkpoint.every=300",
            "log_every=100",
        )
    )
    assert s["step"] == 600
    config = json.load(open(os.path.join(store, "router/export/config.json")))
    assert config["job"] == "router" and config["num_partitions"] == 2 and config["partition"] is None
    model_cfg = ModelConfig(
        **{**config["model"], "data_shape": tuple(config["model"]["data_shape"]), "moe": ModelConfig().moe}
    )
    router = build_router(model_cfg, 2).eval()
    router.load_state_dict(exported(store, "router"))
    batch = PartitionReader(Store(store), None, batch_size=512, seed=9).next_batch()

    def accuracy(t: float) -> float:
        g = torch.Generator().manual_seed(0)
        x_t = (1 - t) * batch["x"] + t * torch.randn(batch["x"].shape, generator=g)
        with torch.no_grad():
            pred = router(x_t, torch.full((512,), t)).argmax(1)
        return (pred == batch["partition"]).float().mean().item()

    low, high = accuracy(0.05), accuracy(0.98)
    assert low > 0.75 and low > high + 0.2, (low, high)  # high noise: near chance (0.5)


# --- resume on another worker count (ddm.checkpoint.reshard) --------------------------------------------


def train_on(workers: int, store: str, *overrides: str) -> dict:
    """The job on 1 worker (one process, ``python -m ddm.train``) or more (ranks as torchrun starts
    them, one thread each as Ray's 1-CPU workers have: the resharding tests are about DeepSpeed's
    state, and the Ray tests above run the same function under Ray Train)."""
    if workers == 1:
        return summary(run_cli(store, "ray.num_workers=1", *overrides))
    return on_ranks("ddm.train", store, workers, *overrides)


def on_ranks(module: str, store: str, world: int, *overrides: str) -> dict:
    """``python -m <module>`` on ``world`` ranks, as torchrun starts them (no Ray), one thread each
    as Ray's 1-CPU workers have (a later ``threads=`` wins); rank 0's JSON."""
    from ddm.distributed.parallel import _free_port

    port = _free_port()
    cmd = [sys.executable, "-m", module, f"store={store}", *TRAIN, f"ray.num_workers={world}", "threads=1", *overrides]
    ranks = {
        "LOCAL_WORLD_SIZE": str(world),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    procs = [
        subprocess.Popen(
            cmd,
            env=child_env({**ranks, "RANK": str(r), "LOCAL_RANK": str(r)}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


def reshard_check(store: str, world: int, *overrides: str) -> dict:
    """``tests.reshard_check`` on ``world`` ranks: the newest commit restored on that world size,
    compared with the state DeepSpeed saved."""
    return on_ranks("tests.reshard_check", store, world, *overrides)


def _resume_elsewhere(prepared, tmp_path, before: int, after: int, zero: int) -> tuple[dict, dict, str]:
    store = fresh(prepared, tmp_path)
    common = ["checkpoint.every=2", f"engine.zero_stage={zero}"]
    assert train_on(before, store, "steps=4", *common)["world_size"] == before
    check = reshard_check(store, after, *common)
    resumed = train_on(after, store, "steps=6", *common)
    return check, resumed, store


# 1 -> 2 is in the slow tier: the islands test resumes a lost job from 1 worker on 2 end to end.
@pytest.mark.parametrize("before,after", [(2, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_a_job_resumes_on_another_worker_count(prepared, tmp_path, before, after):
    """A ZeRO-2 job checkpointed by N workers resumes on M: after the restore, every parameter's
    fp32 weights and both Adam moments, as DeepSpeed reports them, equal what was saved (the
    reference is rebuilt from the commit's portable files with safetensors alone); Adam's step carries over; training
    continues from the commit, the loss curve going on from the first run's records. (The losses
    themselves differ from an uninterrupted run's: M workers draw other batches and noise.)"""
    check, resumed, store = _resume_elsewhere(prepared, tmp_path, before, after, zero=2)
    assert check["step"] == 4 and check["resharded_from"] == before and check["params"] > 10
    # Under torchrun every rank writes under rank 0's lease: its markers name the generation.
    ckpts = Store(store).child("experts/00/checkpoints")
    markers = [ckpts.read_json(f"step_0000004/.rank{r:03d}.done") for r in range(before)]
    assert {m["lease"] for m in markers} == {ckpts.manifest("step_0000004")["writer"]["lease"]} != {None}
    assert check["max_diff"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "module": 0.0}
    assert check["adam_step"] == check["saved_adam_step"] == 4.0 and check["moment_scale"] > 0
    assert resumed["startup"]["resumed_from"] == 4 and resumed["world_size"] == after and resumed["step"] == 6
    curve = [json.loads(line) for line in open(os.path.join(store, "experts/00/metrics.jsonl"))]
    assert [m["step"] for m in curve] == [2, 4, 6] and all(0 < m["loss"] < 10 for m in curve)
    assert curve[-1]["loss"] == resumed["final_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 3])
def test_other_zero_stages_reshard_like_zero2(prepared, tmp_path, ray_runtime, zero):
    """ZeRO 0 and 3 reshard 2 -> 1 too, to the same training as ZeRO-2 (the stages differ only in
    how the state is split): the same loss and, within float error, the same weights."""
    check, resumed, store = _resume_elsewhere(prepared, tmp_path, 2, 1, zero=zero)
    assert check["max_diff"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "module": 0.0}
    assert check["adam_step"] == 4.0 and resumed["startup"]["resumed_from"] == 4
    _, zero2, store2 = _resume_elsewhere(prepared, tmp_path / "zero2", 2, 1, zero=2)
    assert resumed["final_loss"] == pytest.approx(zero2["final_loss"], rel=1e-5)
    a, b = exported(store), exported(store2)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_checkpoint_without_portable_state_names_its_worker_count(prepared, tmp_path):
    """A commit of ddm < 0.3 (no portable state) on another worker count is a clear error, never a
    silent start-over: the 2-rank job's restore raises it before any engine is touched."""
    from ddm.checkpoint.manager import CheckpointManager

    store = fresh(prepared, tmp_path)
    train_on(1, store, "steps=2", "checkpoint.every=2")
    run = Store(store).child("experts/00")
    ckpts = run.child("checkpoints")
    manifest = ckpts.manifest("step_0000002")
    files = [n for n in manifest["files"] if not n.startswith("portable/")]
    ckpts.commit("step_0000002", files, meta={"world_size": 1, "format_version": 2}, known=manifest["files"])
    manager = CheckpointManager(run, rank=1, world_size=2)
    with pytest.raises(
        ValueError, match="written by 1 ranks; this job has 2.*no portable state.*Resume with 1 workers"
    ):
        manager.load_latest(engine=None)
    manager.close()


@pytest.mark.slow
def test_moe_experts_reshard(prepared, tmp_path, ray_runtime):
    """MoE (ZeRO-1): 2 -> 1 workers with every expert on each rank restores every expert's state
    exactly; with expert parallelism (ep_size 2) 2 -> 4 workers resumes with the experts spread."""
    moe = ["checkpoint.every=2", "engine.zero_stage=1", "model.moe.num_experts=4", "model.moe.every=1"]
    store = fresh(prepared, tmp_path)
    train_on(2, store, "steps=4", *moe, "model.moe.ep_size=1")
    check = reshard_check(store, 1, *moe, "model.moe.ep_size=1")
    assert check["max_diff"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "module": 0.0}
    assert check["adam_step"] == 4.0
    store = fresh(prepared, tmp_path, "ep2")
    train_on(2, store, "steps=4", *moe, "model.moe.ep_size=2")
    s = ray_train(ray_cfg(store, "steps=6", *moe, "model.moe.ep_size=2", "ray.num_workers=4"))
    assert s["startup"]["resumed_from"] == 4 and s["world_size"] == 4
    assert s["expert_weights_differ_across_ranks"] is True and s["dense_max_diff_across_ranks"] == 0.0
