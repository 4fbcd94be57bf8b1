"""Islands: two real local Ray clusters (two heads, own ports and temp dirs, on 127.0.0.1), experts
split across them through the Ray Jobs API, one island lost mid-training and brought back, and
nothing passing between them except the store (moto's S3 server, credentials forwarded by name)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from ddm.store import Store
from tests.conftest import BUCKET, SECRET
from tests.helpers import child_env, free_port, free_ports
from tests.test_pipeline import ddm

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


class LocalIsland:
    """One Ray cluster: a head started with `ray start --head --block`, its own ports and temp dir."""

    def __init__(self, name: str, root, auth_token: str | None = None, env: dict | None = None):
        """``env``: variables every process of the cluster gets (its jobs' too)."""
        self.name, self.root, self.auth_token, self.env = name, root, auth_token, env or {}
        self.ports = dict(zip(("gcs", "dashboard", "client", "agent"), free_ports(4)))
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def start(self) -> None:
        temp = f"/tmp/ddm-isl-{self.name}-{os.getpid()}"  # short: Ray's socket paths have a length limit
        shutil.rmtree(temp, ignore_errors=True)
        env = child_env(
            {**self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token}
            if self.auth_token
            else {**self.env, "RAY_AUTH_MODE": "disabled"}
        )
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats", "--num-cpus=2",
            "--node-ip-address=127.0.0.1", f"--port={self.ports['gcs']}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.ports['dashboard']}", f"--ray-client-server-port={self.ports['client']}",
            f"--dashboard-agent-listen-port={self.ports['agent']}", f"--temp-dir={temp}",
        ]  # fmt: skip
        self.log = open(self.root / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 120
        while True:
            try:
                headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else None
                JobSubmissionClient(self.address, headers=headers).list_jobs()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"island {self.name} did not start; see {self.root}/{self.name}.log")
                time.sleep(1)

    def stop(self) -> None:
        """Kill the whole cluster (head, raylet, workers, job drivers) as a lost island would be."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        # Processes Ray daemonised out of the group: match this island's GCS port / temp dir.
        subprocess.run(["pkill", "-9", "-f", f"ddm-isl-{self.name}-{os.getpid()}"], check=False)
        subprocess.run(["pkill", "-9", "-f", f"127.0.0.1:{self.ports['gcs']}"], check=False)
        # Job drivers run in sessions of their own: they are this island's if they talk to its GCS.
        import psutil

        for proc in psutil.process_iter():
            try:
                if proc.environ().get("RAY_ADDRESS", "").endswith(f":{self.ports['gcs']}"):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.proc = None
        time.sleep(2)


@pytest.fixture(scope="module")
def two_islands(tmp_path_factory, s3_endpoint):
    """Two islands whose nodes start with the store's credentials in their environment."""
    root = tmp_path_factory.mktemp("islands")
    # Island b's jobs pause at step PAUSE_AT (once: the marker file stays), so the test loses b
    # mid-training at a known step, however fast this machine trains.
    pause = {"DDM_FAULT": f"step:{PAUSE_AT}", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": str(root / "b-paused")}
    a, b = LocalIsland("a", root), LocalIsland("b", root, env=pause)
    b.paused = root / "b-paused"
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


PAUSE_AT = 15  # island b's jobs pause here, after their first commit (step 10 in the lost-island test)

SPEC = {
    "seed": 2,
    "ingest": {"source": "digits", "shard_size": 1000},
    "partition": {"num_partitions": 2, "num_fine": 64},
    "expert": {
        "model": {"arch": "DiT-Tiny/2", "data_shape": [1, 8, 8], "num_classes": 10},
        "steps": 300, "global_batch_size": 16, "checkpoint": {"every": 25}, "log_every": 5, "ray": {"num_workers": 1},
    },
    "router": {
        "job": "router", "model": {"arch": "DiT-Tiny/2", "data_shape": [1, 8, 8], "num_classes": 10},
        "steps": 10, "global_batch_size": 16, "checkpoint": {"every": 10}, "log_every": 5, "ray": {"num_workers": 1},
    },
}  # fmt: skip


def islands_file(
    path, store: str, islands: dict, workers: dict | None = None, tokens: dict | None = None, **extra
) -> str:
    """``workers``: island -> ray.num_workers of the jobs it runs (default: the spec's);
    ``tokens``: island -> the variable holding its Ray token (its ``auth_token_env``)."""
    workers, tokens = workers or {}, tokens or {}
    doc = {
        "store": store,
        # No secrets: each island reads the store with the credentials it started with (its own env).
        "env": ["AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"],
        "islands": {
            name: {
                "address": addr,
                "ddm_command": f"{sys.executable} -m ddm.cli",
                "overrides": {
                    "ray": {"cpus_per_worker": 1, **({"num_workers": workers[name]} if name in workers else {})}
                },
                **({"auth_token_env": tokens[name]} if name in tokens else {}),
            }
            for name, addr in islands.items()
        },
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_log(island: LocalIsland, job: str) -> str:
    """The tail of the log of ``job``'s newest submission on ``island`` (for failure messages)."""
    from ray.job_submission import JobSubmissionClient

    c = JobSubmissionClient(island.address)
    ids = [j.submission_id for j in c.list_jobs() if (j.metadata or {}).get("ddm_job") == job]
    return c.get_job_logs(ids[-1])[-6000:] if ids else f"(no job {job} on island {island.name})"


def committed_steps(store: Store, run_dir: str) -> list[int]:
    run = store.child(f"{run_dir}/checkpoints")
    return sorted(
        int(n[5:])
        for n in (run.list("") if store.exists(f"{run_dir}/checkpoints") else [])
        if n.startswith("step_") and run.is_committed(n)
    )


def text_spec(store_url: str, steps: int) -> dict:
    """A text run for islands: ``ddm run``'s tiny encoder made in the (S3) store, text experts and a
    text router that each load it by its ``store:`` name through S3 (``tests/test_text_run.py``)."""
    from tests.test_text_run import TEXT_RUN

    doc = {k: TEXT_RUN[k] for k in ("seed", "ingest", "partition", "sample")}
    doc["tiny_text_encoder"] = {**TEXT_RUN["tiny_text_encoder"], "embeddings": "job"}
    one = {"ray": {"num_workers": 1}, "log_every": 5}
    expert = {**TEXT_RUN["expert"], **one, "steps": steps, "checkpoint": {"every": 10}}
    router = {**TEXT_RUN["router"], **one, "steps": 10, "checkpoint": {"every": 10}}
    return {**doc, "store": store_url, "expert": expert, "router": router}


@pytest.fixture(scope="module")
def lost_and_resumed(two_islands, s3_endpoint, tmp_path_factory):
    """A text run (the class-conditional spec's islands path is the same but for the encoder) on
    two islands: submitted, island b lost mid-training, its expert moved to another island and
    resumed there, the ensemble assembled. Checked as it goes; later tests reuse its store."""
    a, b = two_islands
    tmp_path = tmp_path_factory.mktemp("lost")
    store_url = f"s3://{BUCKET}/islands-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.yaml"
    steps = 30  # past PAUSE_AT, so island b is lost mid-training
    spec.write_text(yaml.safe_dump(text_spec(store_url, steps)))
    isl = islands_file(
        tmp_path / "islands.yaml",
        store_url,
        {"a": a.address, "b": b.address},
        assignment={0: "a", 1: "b"},
        router_island="a",
    )
    out = ddm("submit", str(spec), "--islands", isl)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "expert-00  -> a" in out.stdout and "expert-01  -> b" in out.stdout and "router" in out.stdout
    store = Store(store_url)
    plan = store.read_json("islands/plan.json")
    assert [(j["name"], j["island"]) for j in plan["jobs"]] == [("expert-00", "a"), ("expert-01", "b"), ("router", "a")]

    # Submitting again while the jobs are pending or running submits nothing (deterministic ids).
    again = ddm("submit", str(spec), "--islands", isl)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stderr[-2000:]
    from ray.job_submission import JobSubmissionClient

    ids = [
        j.submission_id
        for j in JobSubmissionClient(a.address).list_jobs()
        if (j.submission_id or "").startswith("ddm-")
    ]
    assert len(ids) == 2  # expert-00 and the router, once each
    # Nothing the job server returns (job info, runtime env, metadata, entrypoint, logs) holds the secret.
    for island in (a, b):
        c = JobSubmissionClient(island.address)
        for job in c.list_jobs():
            assert SECRET not in repr(job)  # every field, the runtime env's variables included
            assert SECRET not in c.get_job_logs(job.submission_id)

    # Island b is lost once its expert has committed a checkpoint (it pauses at step 15, after the
    # commit of step 10, whose upload goes on in the background); island a is not affected.
    wait_for(b.paused.exists, 240, f"expert 1 on island b at step {PAUSE_AT}")
    wait_for(lambda: committed_steps(store, "experts/01"), 60, "a committed checkpoint of expert 1 on island b")
    b.stop()
    st = ddm("status", "--islands", isl)
    assert st.returncode == 0, st.stderr[-2000:]
    row = next(line for line in st.stdout.splitlines() if line.startswith("expert-01"))
    assert "UNREACHABLE" in row and f"island b: island 'b' cannot be reached at {b.address}" in st.stdout
    wait_for(
        lambda: store.child("experts/00").is_committed("export") and store.child("router").is_committed("export"),
        300,
        "island a's jobs",
    )
    never_interrupted = store.child("experts/00").read_json("summary.json")["startup"]["resumed_from"] is None
    assert never_interrupted, "expert-00 on island a was restarted; its job's log:\n" + job_log(a, "expert-00")
    resumed_at = committed_steps(store, "experts/01")[-1]
    assert not store.child("experts/01").is_committed("export")

    # Island b comes back empty (a new cluster): its server no longer knows the job -> LOST.
    b.start()
    st = ddm("status", "--islands", isl, "--json")
    rows = {r["job"]: r for r in json.loads(st.stdout)["jobs"]}
    assert rows["expert-01"]["state"] == "LOST" and rows["expert-00"]["done"] and rows["router"]["done"]
    # The lost job moves to another island ("a2": island a's cluster, its jobs on 2 workers) and
    # resumes there from its last commit, resharded from 1 worker to 2.
    isl2 = islands_file(
        tmp_path / "islands2.yaml", store_url, {"a": a.address, "b": b.address, "a2": a.address}, workers={"a2": 2}
    )
    bad = ddm("resume", "--islands", isl2, "--move", "expert-07=a2")
    assert bad.returncode != 0 and "the run has no job 'expert-07'" in bad.stderr
    res = ddm("resume", "--islands", isl2, "--move", "expert-01=a2", "--wait", timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {"store": store_url, "spec": spec, "islands": isl, "steps": steps, "resumed_at": resumed_at, "out": res}


def test_experts_across_two_islands_one_lost_and_resumed(lost_and_resumed):
    store_url, steps, res = lost_and_resumed["store"], lost_and_resumed["steps"], lost_and_resumed["out"]
    store, resumed_at = Store(store_url), lost_and_resumed["resumed_at"]
    assert "expert-01  -> a2" in res.stdout and "assembled" in res.stdout
    summary = store.child("experts/01").read_json("summary.json")
    assert summary["step"] == steps and summary["startup"]["resumed_from"] >= resumed_at  # from its last commit
    assert summary["world_size"] == 2
    assert store.read_json("islands/jobs/expert-01.json")["attempt"] == 1
    assert next(j for j in store.read_json("islands/plan.json")["jobs"] if j["name"] == "expert-01")["island"] == "a2"
    ensemble = store.read_json("ensemble.json")
    assert ensemble["num_experts"] == 2 and ensemble["text"] == {
        "encoder": "store:text_encoder",
        "dim": 32,
        "length": 24,
    }
    loaded = json.loads(store.child("experts/01").read_verified("export", "config.json"))["text_encoder"]
    assert loaded["spec"] == "store:text_encoder" and len(loaded["sha256"]["model.safetensors"]) == 64
    prompt = "uppercase R in dejavu serif, large"  # the ensemble on S3 samples prompts, its encoder found there
    drawn = ddm("sample", store_url, "num_samples=2", "steps=2", f"prompts=[{prompt!r}]", "name=island")
    assert drawn.returncode == 0, drawn.stderr[-4000:]
    assert [r["prompt"] for r in store.read_json("samples/island/prompts.json")] == [prompt] * 2


def test_unreachable_island_and_refused_credentials_change_nothing(two_islands, s3_endpoint, tmp_path):
    a, _ = two_islands
    store_url = f"s3://{BUCKET}/bad-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "store": store_url}))
    dead = f"http://127.0.0.1:{free_port()}"
    isl = islands_file(tmp_path / "dead.yaml", store_url, {"a": a.address, "gone": dead}, assignment={1: "gone"})
    out = ddm("submit", str(spec), "--islands", isl)
    assert out.returncode == 2 and f"island 'gone' cannot be reached at {dead}" in out.stderr
    assert not Store(store_url).exists("data") and not Store(store_url).exists("islands")  # nothing written

    # Its jobs all pause at their first step, holding no CPU, until the island is stopped: this test
    # is about who may talk to the job server, not about training.
    pause = {"DDM_FAULT": "step:1", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_GO": str(tmp_path / "never")}
    locked = LocalIsland("locked", tmp_path, auth_token="the-right-token", env=pause)
    locked.start()
    try:
        isl = islands_file(tmp_path / "locked.yaml", store_url, {"locked": locked.address})
        os.environ["RAY_AUTH_TOKEN"] = "a-wrong-token"
        try:
            out = ddm("submit", str(spec), "--islands", isl)
        finally:
            del os.environ["RAY_AUTH_TOKEN"]
        assert out.returncode == 2 and "authentication failed" in out.stderr, out.stderr[-2000:]
        assert not Store(store_url).exists("islands/plan.json")
        # Per-island tokens: the islands file names the variable, the shell holds the value.
        from ddm.launchers.islands import IslandError, client
        from ddm.launchers.plan import Island

        island = Island(locked.address, auth_token_env="DDM_TEST_LOCKED_TOKEN")
        with pytest.raises(IslandError, match=r"\$DDM_TEST_LOCKED_TOKEN, which this shell does not set"):
            client("locked", island)
        os.environ["DDM_TEST_LOCKED_TOKEN"] = "the-right-token"
        try:
            client("locked", island).list_jobs()  # accepted
        finally:
            del os.environ["DDM_TEST_LOCKED_TOKEN"]
        # Every command that talks to the job server carries the island's token: submit, status, resume.
        ok_store = f"s3://{BUCKET}/locked-{uuid.uuid4().hex[:6]}"
        spec_ok = tmp_path / "spec-ok.yaml"
        spec_ok.write_text(yaml.safe_dump({**SPEC, "store": ok_store}))
        isl = islands_file(
            tmp_path / "locked-ok.yaml",
            ok_store,
            {"locked": locked.address},
            tokens={"locked": "DDM_TEST_LOCKED_TOKEN"},
        )
        token = {"DDM_TEST_LOCKED_TOKEN": "the-right-token"}
        out = ddm("submit", str(spec_ok), "--islands", isl, env=token)
        assert out.returncode == 0 and "expert-00  -> locked" in out.stdout, out.stderr[-2000:]
        st = ddm("status", "--islands", isl, env=token)
        assert st.returncode == 0 and "UNREACHABLE" not in st.stdout and "expert-00" in st.stdout, st.stderr[-2000:]
        res = ddm("resume", "--islands", isl, env=token)
        assert res.returncode == 0 and "nothing to resume" in res.stdout, res.stderr[-2000:]
        st = ddm("status", "--islands", isl)  # no token in this shell: refused, and said so
        assert "$DDM_TEST_LOCKED_TOKEN, which this shell does not set" in st.stdout + st.stderr
    finally:
        locked.stop()


def test_a_spec_that_disagrees_with_the_submitted_run_is_refused(lost_and_resumed):
    """Submitting the run again with a setting changed is refused, naming it; the plan and every
    job's record stay as they were (on the store of the run that was lost and resumed)."""
    store = Store(lost_and_resumed["store"])
    plan = store.read_bytes("islands/plan.json")
    records = {n: store.read_bytes(f"islands/jobs/{n}.json") for n in ("expert-00", "expert-01", "router")}
    bad = ddm("submit", str(lost_and_resumed["spec"]), "--islands", lost_and_resumed["islands"], "expert.lr=0.5")
    assert bad.returncode == 2 and "lr: 0.0001 -> 0.5" in bad.stderr, bad.stderr[-2000:]
    assert store.read_bytes("islands/plan.json") == plan
    assert {n: store.read_bytes(f"islands/jobs/{n}.json") for n in records} == records  # nothing submitted


# --- planning, without clusters ----------------------------------------------------------------


def test_balanced_assignment_follows_capacity_and_explicit_map():
    from ddm.launchers.plan import Island, IslandsConfig, assign

    cfg = IslandsConfig(
        store="s3://b/r", islands={"big": Island("http://a:1", capacity=2), "small": Island("http://b:1", capacity=1)}
    )
    sizes, steps = [300, 100, 200, 100, 200, 300], [10] * 6
    where = assign(sizes, cfg, steps)
    load = {n: sum(s for s, w in zip(sizes, where) if w == n) for n in cfg.islands}
    assert load == {"big": 800, "small": 400}  # work per unit of capacity is equal
    pinned = IslandsConfig(store="s3://b/r", islands=cfg.islands, assignment={0: "small", 5: "small"})
    where = assign(sizes, pinned, steps)
    assert where[0] == where[5] == "small" and all(w == "big" for i, w in enumerate(where) if i not in (0, 5))
    with pytest.raises(ValueError, match=r"assignment names partitions \[9\]"):
        assign(sizes, IslandsConfig(store="s3://b/r", islands=cfg.islands, assignment={9: "big"}), steps)


def test_steps_policy_and_island_overrides_shape_each_job():
    from ddm.core.config import from_dict
    from ddm.launchers.plan import Island, IslandsConfig, plan_jobs
    from ddm.launchers.spec import RunSpec

    spec = from_dict(RunSpec, {**SPEC, "store": "ignored"})
    islands = IslandsConfig(
        store="s3://b/r",
        islands={
            "gpu": Island("http://a:1", capacity=3, overrides={"ray": {"num_workers": 2, "use_gpu": True}}),
            "cpu": Island("http://b:1"),
        },
        steps_policy="proportional",
    )
    jobs = plan_jobs(spec, islands, [100, 300])
    experts = {j.name: j for j in jobs if j.config.kind == "expert"}
    assert experts["expert-00"].config.steps == 150 and experts["expert-01"].config.steps == 450  # 300 x n_k / mean
    router = jobs[-1]
    assert router.name == "router" and router.island == "gpu"  # the largest island by default
    for j in jobs:
        assert j.config.store == "s3://b/r" and j.config.seed == 2
        assert (j.config.ray.num_workers, j.config.ray.use_gpu) == ((2, True) if j.island == "gpu" else (1, False))


def test_a_moved_job_may_change_only_what_a_resumed_job_may():
    from ddm.core.config import from_dict
    from ddm.launchers.plan import Island, IslandsConfig, plan_jobs, plan_record, relocated
    from ddm.launchers.spec import RunSpec

    spec = from_dict(RunSpec, {**SPEC, "store": "ignored"})
    islands = IslandsConfig(
        store="s3://b/r",
        islands={
            "a": Island("http://a:1"),
            "big": Island("http://b:1", overrides={"ray": {"num_workers": 4, "use_gpu": True}}),
            "other": Island("http://c:1", overrides={"lr": 0.5}),
        },
        assignment={0: "a", 1: "a"},
        router_island="a",
    )
    job = plan_record(plan_jobs(spec, islands, [100, 100]), islands)["jobs"][0]
    moved = relocated(job, "big", islands)
    assert moved["island"] == "big" and moved["config"]["ray"]["num_workers"] == 4 and moved["config"]["ray"]["use_gpu"]
    assert moved["config"]["model"] == job["config"]["model"] and moved["config"]["lr"] == job["config"]["lr"]
    with pytest.raises(ValueError, match=r"--move expert-00=other: .*change what the job trains \(lr: 0.0001 -> 0.5\)"):
        relocated(job, "other", islands)
