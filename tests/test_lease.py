"""One writer per folder: leases in the store (file://, memory:// and S3 through a real endpoint)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from ddm.store import Store, layout
from ddm.store.lease import Lease, LeaseHeld, LeaseLost, fenced, holding, read_record
from tests.helpers import child_env
from tests.test_train import TRAIN, fresh, prepared, run_cli  # noqa: F401 - fixture


def test_create_json_is_exclusive(store_url):
    store = Store(store_url)
    assert store.create_json("x/one.json", {"a": 1})
    assert not store.create_json("x/one.json", {"a": 2})
    assert store.read_json("x/one.json") == {"a": 1}
    assert store.list("x") == ["one.json"]  # no temporary files left


def test_racing_creates_have_one_winner(store_url):
    """Eight threads with their own clients create the same name at once: exactly one wins."""
    results, barrier = [], threading.Barrier(8)

    def race(i):
        store = Store(store_url)
        barrier.wait()
        results.append((store.create_json("race.json", {"who": i}), i))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for ok, i in results if ok]
    assert len(winners) == 1 and Store(store_url).read_json("race.json") == {"who": winners[0]}


def test_second_writer_refused_until_release(store_url):
    store = Store(store_url)
    with holding(store, "experts/00", "ddm train experts/00") as (writes, token):
        writes.write_json("experts/00/config.json", {"lr": 1e-4})
        with pytest.raises(LeaseHeld, match=r"being written by `ddm train experts/00`.*expires in \d+ s.*--force"):
            Lease(Store(store_url), "experts/00", "second").acquire()
        other = Lease(Store(store_url), "experts/01", "other folder")  # other folders are free
        other.acquire()
        other.release()
    lease = Lease(Store(store_url), "experts/00", "next")  # released: the next writer need not wait
    assert lease.acquire().generation == token.generation + 1
    lease.release()


def test_expired_lease_taken_and_old_writer_fenced(store_url):
    """A holder that stopped renewing (paused, cut off) loses the lease after ttl; it cannot write
    after that, even through a store it already had."""
    store = Store(store_url)
    old = Lease(store, "router", "old", ttl_s=1.0)
    token = old.acquire()  # no renewing thread: as if the holder were paused
    writes = fenced(store, token)
    writes.write_json("router/a.json", {})
    with pytest.raises(LeaseHeld):
        Lease(Store(store_url), "router", "new", ttl_s=1.0).acquire()
    time.sleep(1.1)
    new = Lease(Store(store_url), "router", "new", ttl_s=1.0)
    assert new.acquire().generation == 2
    with pytest.raises(LeaseLost, match="taken over by `new`"):
        writes.commit("router", ["a.json"])
    with pytest.raises(LeaseLost):
        writes.write_json("router/b.json", {})  # once lost, always lost: no store call needed
    assert not store.exists("router/MANIFEST.json") and not store.exists("router/b.json")
    old.renew()
    assert old.lost == "taken over"


def test_holder_that_stops_renewing_fences_itself(store_url):
    """With nobody taking over, a lease not renewed for 0.8 ttl still stops its writers (a paused
    holder must not race a taker it cannot see)."""
    store = Store(store_url)
    lease = Lease(store, "monolith", "paused", ttl_s=1.0)
    writes = fenced(store, lease.acquire())
    writes.commit("monolith", [])
    time.sleep(0.9)
    with pytest.raises(LeaseLost, match="not renewed for"):
        writes.commit("monolith", [])


@pytest.mark.parametrize(
    "store_url",
    ["file", pytest.param("memory", marks=pytest.mark.slow), pytest.param("s3", marks=pytest.mark.slow)],
    indirect=True,
)  # renewal is the same code on every store (2.5 s each): one by default, the others in the slow tier
def test_renewal_keeps_a_lease_alive_past_its_ttl(store_url):
    store = Store(store_url)
    lease = Lease(store, "data", "ingest", ttl_s=1.0)
    writes = fenced(store, lease.acquire())
    lease.start()
    try:
        time.sleep(2.5)
        writes.commit("data", [])  # still ours: renewed every ttl/4
        with pytest.raises(LeaseHeld):
            Lease(Store(store_url), "data", "second", ttl_s=1.0).acquire()
    finally:
        lease.release()


def test_force_takes_over_a_live_lease(store_url, caplog):
    store = Store(store_url)
    with holding(store, "partitions", "first") as (writes, _):
        taker = Lease(Store(store_url), "partitions", "second")
        taker.acquire(force=True)
        assert "loses its work since its last commit" in caplog.text
        with pytest.raises(LeaseLost):
            writes.delete("partitions", recursive=True)
        taker.release()


def test_acquire_waits_for_a_release(store_url):
    store = Store(store_url)
    first = Lease(store, "islands", "first")
    first.acquire()
    threading.Timer(0.5, first.release).start()
    t0 = time.monotonic()
    Lease(Store(store_url), "islands", "second", ttl_s=1.0).acquire(wait_s=10)
    assert 0.4 < time.monotonic() - t0 < 5


def _killed_holder(url: str, folder: str, what: str, ttl_s: float | None = None) -> None:
    """A process that takes the lease on ``folder`` and dies with kill -9 (nothing released)."""
    code = (
        "import os, signal\n"
        "from ddm.store.lease import Lease\nfrom ddm.store.store import Store\n"
        f"Lease(Store({url!r}), {folder!r}, {what!r}, ttl_s={ttl_s!r}).acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)


def test_a_dead_local_holder_is_taken_over_at_once(tmp_path):
    """A holder on this machine whose process is gone (kill -9) does not make the next run wait for
    its ttl."""
    url = str(tmp_path / "store")
    _killed_holder(url, "experts/02", "killed")
    record = Store(url).read_json(f"{layout.lease_dir('experts/02')}/00000001.json")
    assert record["what"] == "killed" and not record.get("released")
    lease = Lease(Store(url), "experts/02", "next")  # ttl 120 s: only the dead pid lets it in now
    assert lease.acquire().generation == 2
    lease.release()


def test_a_holder_killed_on_another_machine_is_taken_over_after_expiry(tmp_path):
    """Its pid means nothing here: the next writer waits for the lease to expire, then takes it."""
    url = str(tmp_path / "store")
    _killed_holder(url, "router", "elsewhere", ttl_s=2.0)
    store = Store(url)
    record_path = f"{layout.lease_dir('router')}/00000001.json"
    store.write_json(record_path, {**store.read_json(record_path), "machine": "another-host/boot/ns"})
    with pytest.raises(LeaseHeld, match=r"expires in [0-2] s"):
        Lease(Store(url), "router", "next", ttl_s=2.0).acquire()
    lease = Lease(Store(url), "router", "next", ttl_s=2.0)
    assert lease.acquire(wait_s=10).generation == 2  # waits out the ttl
    lease.release()


def test_records_describe_the_holder(tmp_path):
    store = Store(str(tmp_path))
    with holding(store, "experts/03", "ddm train experts/03"):
        names = store.list(layout.lease_dir("experts/03"))
        record = json.loads(store.read_bytes(f"{layout.lease_dir('experts/03')}/{names[0]}"))
        assert record["pid"] == os.getpid() and record["kind"] == "ddm.lease"
        assert {"holder", "host", "started_at", "renewed_at", "ttl_s"} <= set(record)
    assert read_record(store, "experts/03", 1)["released"] is True
    assert "released" not in store.read_json(f"{layout.lease_dir('experts/03')}/{names[0]}")  # never rewritten


def test_bad_ttl_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DDM_LEASE_TTL_S", "0")
    with pytest.raises(ValueError, match="DDM_LEASE_TTL_S=0.0 must be positive"):
        Lease(Store(str(tmp_path)), "data", "x")


# --- real jobs: two writers, a paused writer ------------------------------------------------------


def _wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _start(store: str, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddm.train", f"store={store}", *TRAIN, *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env))


def test_a_second_job_on_the_same_folder_is_refused(prepared, tmp_path):  # noqa: F811
    """Two `python -m ddm.train` for one partition and store: the second is refused with the holder
    named (a third with another lr too), and everything in the folder is the first one's."""
    store = fresh(prepared, tmp_path)
    marker = tmp_path / "pause"
    pause = {"DDM_FAULT": "step:2", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": str(marker)}
    first = _start(store, "steps=4", "checkpoint.every=2", "lr=0.0001", env=pause)
    try:
        _wait_for(marker.exists, 120, "the first job to reach step 2")
        second = run_cli(store, "steps=4", "checkpoint.every=2", "lr=0.0001")  # the same job: only the lease stops it
        assert second.returncode == 3, second.stderr[-2000:]
        assert "is being written by `ddm train experts/00`" in second.stderr and "Traceback" not in second.stderr
        other = run_cli(store, "steps=4", "checkpoint.every=2", "lr=0.0003")
        assert other.returncode in (2, 3) and "Traceback" not in other.stderr, other.stderr[-2000:]
    finally:
        (tmp_path / "pause.go").touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    run = Store(store).child("experts/00")
    assert run.read_json("config.json")["lr"] == 0.0001
    assert json.loads(out.strip().splitlines()[-1])["final_loss"] == run.read_json("summary.json")["final_loss"]
    holders = {run.manifest(f"checkpoints/{s}")["writer"]["lease"] for s in run.list("checkpoints")}
    assert holders == {run.manifest("export")["writer"]["lease"]} == {1}  # one writer, the first


# Slow tier: the fence after a takeover is covered by default by test_expired_lease_taken_and_old_writer_fenced
# (on file, memory and S3), the hardest pause (right before a commit's publish, its lease just checked) by
# tests/test_trust_store.py's takeover tests, and a SIGSTOPped command by bench/faults.py's paused_writer.
@pytest.mark.slow
def test_a_paused_writer_never_commits_after_another_took_over(prepared, tmp_path):  # noqa: F811
    """SIGSTOP a job past its lease's expiry; a second job takes over and finishes; the first,
    resumed, stops before its next commit: every commit after the pause is the second job's."""
    import signal

    store = fresh(prepared, tmp_path)
    ttl = {"DDM_LEASE_TTL_S": "6"}
    marker = tmp_path / "pause"
    pause = {"DDM_FAULT": "step:3", "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": str(marker)}
    run = Store(store).child("experts/00")
    first = _start(store, "steps=12", "checkpoint.every=2", env={**ttl, **pause})
    try:
        _wait_for(marker.exists, 120, "the first job to commit step 2 and reach step 3")
        first.send_signal(signal.SIGSTOP)
        (tmp_path / "pause.go").touch()  # it would go on now, but it is stopped
        time.sleep(6.5)  # past the ttl: the lease may be taken
        second = run_cli(store, "steps=12", "checkpoint.every=2", env=ttl)
        assert second.returncode == 0, second.stderr[-2000:]
        assert "taking over the expired lease" in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == 3, err[-2000:]
    assert "lost the lease" in err and "taken over by `ddm train experts/00`" in err
    commits = {int(s[5:]): run.manifest(f"checkpoints/{s}")["writer"]["lease"] for s in run.list("checkpoints")}
    assert commits and all(lease == 2 for step, lease in commits.items() if step > 2)
    assert run.manifest("export")["writer"]["lease"] == 2 and run.read_json("summary.json")["step"] == 12
