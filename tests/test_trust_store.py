"""The store is a trust boundary (docs/store.md, the trust model): what another island, a bad disk or
a diverged run writes there never runs code here, never names a path outside its folder, is never
committed when non-finite, and a writer that lost its lease publishes nothing that readers accept.
"""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from ddm.checkpoint.manager import CheckpointManager
from ddm.core.config import load
from ddm.models.exports import cached_weights
from ddm.store import NotCommittedError, Store, StoreError, layout
from ddm.store.lease import Lease, fenced
from ddm.train.job import JobConfig
from tests.helpers import child_env, partitioned_digits, summary

TRAIN = ["partition=0", "global_batch_size=16", "log_every=1", "seed=3", "threads=1"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Digits in 2 partitions, and expert 0 trained 2 steps with a commit at step 2 (copied per test)."""
    root = partitioned_digits(tmp_path_factory.mktemp("trust") / "store")
    assert summary(train(str(root), "steps=2", "checkpoint.every=2"))["step"] == 2
    return root


def train(store: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ddm.train", f"store={store}", *TRAIN, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env())


def fresh(prepared, tmp_path) -> str:
    shutil.copytree(prepared, tmp_path / "run")
    return str(tmp_path / "run")


class Planted:
    """Unpickling this runs code: it creates the file ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def recommit(ckpt: Store, step: str, **meta) -> None:
    """Commit ``step`` again over every file now in it, with ``meta`` (a forger can do this: the
    manifest's digests sit in the same bucket)."""
    names = sorted(
        os.path.relpath(os.path.join(d, n), ckpt.path(step))
        for d, _, ns in os.walk(ckpt.path(step))
        for n in ns
        if n != "MANIFEST.json" and not n.startswith(".")
    )
    old = ckpt.manifest(step)
    ckpt.commit(step, names, meta={k: old[k] for k in ("kind", "step", "world_size") if k in old} | meta)


# --- no code from the store ------------------------------------------------------------------


def test_a_pickle_planted_in_a_checkpoint_never_runs(prepared, tmp_path):
    """A checkpoint file DeepSpeed would unpickle, planted and listed with its right sha256: the
    resume restores from the safetensors state and the planted code never runs."""
    store = fresh(prepared, tmp_path)
    ckpt = Store(store).child("experts/00/checkpoints")
    marker = tmp_path / "code-ran"
    torch.save({"module": Planted(str(marker))}, ckpt.path("step_0000002/mp_rank_00_model_states.pt"))
    recommit(ckpt, "step_0000002", format_version=3, portable=True)
    out = train(store, "steps=4", "checkpoint.every=2")
    assert not marker.exists(), "code from the store ran"
    assert summary(out)["startup"]["resumed_from"] == 2


def test_a_commit_of_deepspeed_files_alone_is_read_without_unpickling_code(prepared, tmp_path):
    """Before format 3 a commit held DeepSpeed's files only: they are read by torch's weights-only
    unpickler, and one that holds anything else is skipped as unusable, its code never run."""
    store = fresh(prepared, tmp_path)
    run = Store(store).child("experts/00")
    ckpt = run.child("checkpoints")
    shutil.rmtree(ckpt.path("step_0000002/portable"))
    marker = tmp_path / "code-ran"
    torch.save({"module": Planted(str(marker))}, ckpt.path("step_0000002/mp_rank_00_model_states.pt"))
    recommit(ckpt, "step_0000002", format_version=2)
    manager = CheckpointManager(run, rank=0, world_size=1)
    assert manager.load_latest(engine=None) is None  # skipped before any engine is touched
    manager.close()
    assert not marker.exists()


def test_a_current_commit_listing_a_pickle_is_unusable(prepared, tmp_path, caplog):
    store = fresh(prepared, tmp_path)
    run = Store(store).child("experts/00")
    ckpt = run.child("checkpoints")
    torch.save({}, ckpt.path("step_0000002/mp_rank_00_model_states.pt"))
    recommit(ckpt, "step_0000002", format_version=4, portable=True)
    manager = CheckpointManager(run, rank=0, world_size=1)
    assert manager.load_latest(engine=None) is None
    manager.close()
    assert "which no ddm checkpoint holds" in caplog.text


def test_a_checkpoint_of_a_newer_ddm_is_refused_as_such(prepared, tmp_path):
    store = fresh(prepared, tmp_path)
    run = Store(store).child("experts/00")
    recommit(run.child("checkpoints"), "step_0000002", format_version=99, portable=True)
    manager = CheckpointManager(run, rank=0, world_size=1)
    with pytest.raises(ValueError, match="written by a newer ddm"):
        manager.load_latest(engine=None)
    manager.close()


# --- names read from the store ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "~/x", "a\\b", "s3://b/k", "", "a/\x00", 3, None]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(layout.UnsafeName, match="manifest of x"):
        layout.safe_relpath(name, "manifest of x")


@pytest.mark.parametrize("name", ["rank000.json", "portable/rank001.safetensors", "experts/03", "a b.png", "x=1"])
def test_safe_names_pass(name):
    assert layout.safe_relpath(name, "here") == name


@pytest.mark.parametrize("digest", ["../" + "a" * 61, "A" * 64, "a" * 63, "/" + "a" * 63, "g" * 64])
def test_digests_are_64_hex_characters(digest):
    with pytest.raises(layout.UnsafeName):
        layout.check_digest(digest, "ensemble.json")


def test_a_manifest_naming_an_absolute_path_writes_nothing_outside(tmp_path):
    """A restore copies each listed file to local scratch: an absolute name would put the bytes
    anywhere on the machine."""
    outside = tmp_path / "outside" / "planted.txt"
    run = Store(str(tmp_path / "store")).child("experts/00")
    ckpt = run.child("checkpoints")
    payload = b"written by another island"
    ckpt.write_bytes(f"step_0000002/{outside}", payload)
    save_file({"x": torch.zeros(1)}, ckpt.path("step_0000002/rank000.safetensors"))
    ckpt.write_json("step_0000002/rank000.json", {"step": 2})
    known = {str(outside): {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}}
    ckpt.commit("step_0000002", ["rank000.safetensors", "rank000.json", str(outside)], known=known)
    manager = CheckpointManager(run, rank=0, world_size=1)
    with contextlib.suppress(Exception):  # whatever happens after the staging, nothing is written outside
        manager.load_latest(engine=None)
    manager.close()
    assert not outside.exists()


def test_a_cache_key_from_the_store_deletes_nothing_outside_the_cache(tmp_path):
    """ensemble.json's sha256 names a cache file: a '../' value must not reach another file."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"someone's weights")
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(layout.UnsafeName):
        cached_weights(Store(str(tmp_path / "store")).child("experts/00"), "../victim", str(cache))
    assert victim.read_bytes() == b"someone's weights"


# --- nothing non-finite is committed ---------------------------------------------------------


@pytest.mark.parametrize(
    "override,field",
    [
        ("lr=nan", "lr"),
        ("lr=inf", "lr"),
        ("weight_decay=-1", "weight_decay"),
        ("ray.gpus_per_worker=nan", "ray.gpus_per_worker"),
        ("flow.logit_std=nan", "flow.logit_std"),
        ("ema_decay=.nan", "ema_decay"),
    ],
)
def test_configs_refuse_non_finite_and_out_of_range_numbers(tmp_path, override, field):
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        load(JobConfig, None, [f"store={tmp_path}", override])


def test_json_files_never_hold_nan(tmp_path):
    store = Store(str(tmp_path))
    with pytest.raises(ValueError):
        store.write_json("summary.json", {"final_loss": float("nan")})
    assert not store.exists("summary.json")


def test_a_diverging_job_stops_before_committing_anything_non_finite(prepared, tmp_path):
    """lr=1e30: the loss is infinite within a few steps. The job exits 2 with one line naming the
    step and the last good commit, keeps the good checkpoints, exports nothing, and every JSON file
    it wrote parses."""
    store = fresh(prepared, tmp_path)
    shutil.rmtree(os.path.join(store, "experts"))
    out = train(store, "steps=8", "checkpoint.every=1", "lr=1e30")
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "diverged" in line and "not finite at step" in line and "last good commit" in line, line
    run = Store(store).child("experts/00")
    assert not run.is_committed("export")
    steps = layout.committed_steps(run.child("checkpoints"))
    assert steps and max(steps) < 8 and f"step_{max(steps):07d}" in line
    for step in steps:
        ckpt = run.child(f"checkpoints/{layout.step_dir(step)}")
        from safetensors.torch import load_file

        for name in ("rank000.safetensors", "portable/rank000.safetensors"):
            assert all(torch.isfinite(t).all() for t in load_file(ckpt.path(name)).values()), (step, name)
    for line in open(run.path("metrics.jsonl")):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


# --- one writer, no window -------------------------------------------------------------------


def test_rank_markers_of_another_attempt_are_never_committed(tmp_path):
    """A crashed attempt (or another world size) left rank 1's marker of step 2: rank 0 of this
    attempt must wait for this attempt's rank 1, not commit with the stale one."""
    run = Store(str(tmp_path / "store")).child("experts/00")
    ckpt = run.child("checkpoints")
    entry = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    ckpt.write_bytes("step_0000002/rank001.json", b"{}")
    ckpt.write_json("step_0000002/.rank001.done", {"rank001.json": entry})  # before format 4
    manager = CheckpointManager(run, rank=0, world_size=2, commit_timeout_s=0.5)
    ckpt.write_json(  # this format, another attempt
        "step_0000002/.rank001.done",
        {"files": {"rank001.json": entry}, "attempt": "old", "lease": None, "world_size": 2},
    )
    local = tmp_path / "local"
    local.mkdir()
    (local / "rank000.json").write_text("{}")
    with pytest.raises(StoreError, match=r"ranks \[1\] did not finish"):
        manager._upload(2, str(local), ["rank000.json"])
    manager.close()
    assert not ckpt.is_committed("step_0000002")


def test_retries_end_when_they_would_outlast_the_lease(tmp_path):
    """A fenced write retried past the lease's safe window is abandoned at once, not retried for
    minutes while another writer takes over."""

    class Fence:
        safe_until = time.time() + 0.3

        def __call__(self, what, always=False):
            pass

    store = Store(str(tmp_path), retries=3, backoff_s=0.5).with_fence(Fence())

    def unreachable():
        raise ConnectionError("endpoint down")

    t0 = time.monotonic()
    with pytest.raises(StoreError, match="outlast this writer's lease"):
        store._call("write x", unreachable)
    assert time.monotonic() - t0 < 0.4


def test_a_commit_published_after_a_takeover_is_not_a_commit(tmp_path, monkeypatch):
    """Writer A passes its last lease check, then pauses right before publishing its manifest; B
    takes the expired lease; A's manifest lands afterwards. Readers do not take it as a commit."""
    url = str(tmp_path / "store")
    a = Lease(Store(url), "experts/00", "writer A", ttl_s=2.0)
    writes = fenced(Store(url), a.acquire())
    writes.write_json("experts/00/export/model.json", {"a": 1})
    go = tmp_path / "go"
    import ddm.store.store

    monkeypatch.setattr(ddm.store.store, "_COMMITS", iter([1]))
    monkeypatch.setenv("DDM_FAULT", "publish:1")
    monkeypatch.setenv("DDM_FAULT_ACTION", "pause")
    monkeypatch.setenv("DDM_FAULT_GO", str(go))
    monkeypatch.delenv("DDM_FAULT_ONCE", raising=False)  # pause every time the point is reached
    commit = threading.Thread(target=writes.commit, args=("experts/00/export", ["model.json"]))
    commit.start()  # pauses at the publish, its lease checked just before
    time.sleep(2.2)  # A's lease expires
    Lease(Store(url), "experts/00", "writer B", ttl_s=2.0).acquire()
    go.touch()
    commit.join(10)
    reader = Store(url).child("experts/00")
    assert reader.exists("export/MANIFEST.json")  # it landed ...
    with pytest.raises(NotCommittedError, match="late write"):
        reader.manifest("export")  # ... and counts for nothing


def test_leases_are_refused_where_create_is_not_atomic(tmp_path):
    """Two processes could both take a lease on a backend without an atomic create-if-absent."""
    store = Store(str(tmp_path))
    store.protocol = "sftp"  # what a store on such a backend is (no server needed: it fails first)
    with pytest.raises(StoreError, match="cannot create objects exclusively on sftp://"):
        Lease(store, "experts/00", "ddm train").acquire()
    assert not os.path.exists(tmp_path / "leases")


def test_an_s3_conflict_on_create_counts_as_losing_the_race(monkeypatch):
    """S3 answers 409 ConditionalRequestConflict when another conditional PUT of the key is in
    flight: that writer may win, so this one has lost, not failed. (moto's server never answers
    409, so s3fs's error, as it raises it, is made here.)"""
    from botocore.exceptions import ClientError

    store = Store("memory://conflict")
    error = ClientError(
        {"Error": {"Code": "ConditionalRequestConflict"}, "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject"
    )

    def put(*args, **kwargs):
        raise OSError("conflict") from error

    monkeypatch.setattr(store.fs, "pipe_file", put)
    assert store.create_json("leases/x/00000001.json", {"a": 1}) is False


# --- plans and exports read from the store ---------------------------------------------------


def _plan(store_url: str, **changes) -> dict:
    from ddm.core.config import to_dict

    cfg = to_dict(load(JobConfig, None, [f"store={store_url}", "partition=0"]))
    job = {"name": "expert-00", "island": "a", "run_dir": "experts/00", "config": cfg, **changes}
    return {"jobs": [job]}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"name": "../../x"}, "a job's name"),
        ({"run_dir": "/etc"}, "the folder of expert-00"),
        ({"run_dir": "experts/01"}, "not in this store's experts/01"),
    ],
)
def test_a_plan_that_names_paths_outside_or_other_stores_is_refused(tmp_path, change, match):
    """``ddm status`` / ``ddm resume`` use the stored plan's names as paths and its configs as the
    jobs to submit: a plan changed by hand cannot send a job's writes elsewhere."""
    from ddm.launchers.plan import check_plan

    url = str(tmp_path / "store")
    assert check_plan(_plan(url), url, "plan.json")["jobs"]
    with pytest.raises(ValueError, match=match):
        check_plan(_plan(url, **change), url, "plan.json")
    other = _plan(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="would train in .*elsewhere"):
        check_plan(other, url, "plan.json")


def test_an_export_of_a_newer_ddm_is_refused_as_such(prepared, tmp_path):
    from ddm.models.exports import read_export

    store = Store(fresh(prepared, tmp_path))
    run = store.child("experts/00")
    config = json.loads(run.read_bytes("export/config.json"))
    run.write_json("export/config.json", {**config, "format_version": 99})
    run.commit("export", ["model.safetensors", "config.json"])
    with pytest.raises(ValueError, match="written by a newer ddm .*export format 99"):
        read_export(store, "experts/00")


def test_a_late_write_over_the_new_holders_commit_costs_it_nothing(tmp_path, monkeypatch):
    """As above, but B commits the same folder before A's late manifest lands on top of B's: readers
    take B's commit (kept beside as ``.MANIFEST.<generation>.json``), not A's, and not nothing."""
    import ddm.store.store

    url = str(tmp_path / "store")
    a = Lease(Store(url), "experts/00", "writer A", ttl_s=2.0)
    writes_a = fenced(Store(url), a.acquire())
    writes_a.write_json("experts/00/export/model.json", {"by": "A"})
    go = tmp_path / "go"
    monkeypatch.setattr(ddm.store.store, "_COMMITS", iter([1, 2]))
    monkeypatch.setenv("DDM_FAULT", "publish:1")
    monkeypatch.setenv("DDM_FAULT_ACTION", "pause")
    monkeypatch.setenv("DDM_FAULT_GO", str(go))
    monkeypatch.delenv("DDM_FAULT_ONCE", raising=False)
    commit = threading.Thread(target=writes_a.commit, args=("experts/00/export", ["model.json"]))
    commit.start()
    time.sleep(2.2)
    writes_b = fenced(Store(url), Lease(Store(url), "experts/00", "writer B", ttl_s=2.0).acquire())
    writes_b.write_json("experts/00/export/model.json", {"by": "B"})
    writes_b.commit("experts/00/export", ["model.json"])  # publish 2: not paused
    go.touch()
    commit.join(10)
    run = Store(url).child("experts/00")
    assert run.read_json("export/MANIFEST.json")["writer"]["lease"] == 1  # A's landed on top ...
    manifest = run.verify("export")  # ... and readers take B's, whose files verify
    assert manifest["writer"]["lease"] == 2 and run.read_json("export/model.json") == {"by": "B"}


def test_an_island_refuses_a_job_config_rewritten_in_the_store(tmp_path, capsys):
    """An island reads its job's config from the store; the submission carries the config's sha256
    (kept by Ray, not the store), so a config rewritten after the submission is not trained."""
    from ddm.cli import main

    config = tmp_path / "expert-00.config.json"
    config.write_text(json.dumps({"store": str(tmp_path / "elsewhere"), "partition": 0}, indent=2, sort_keys=True))
    submitted = hashlib.sha256(b'{"partition": 0, "store": "s3://our-bucket/run"}').hexdigest()
    assert main(["train", "expert", "-c", str(config), "--config-sha256", submitted, "--no-ray"]) == 2
    assert "is not the one this job was submitted with" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()
