"""A fault campaign: many randomized faults against a small expert on a local S3 server.

Each scenario trains the same small expert (digits, DiT, 24 steps, a checkpoint every 4) on a fresh
store prefix of a real S3 endpoint (moto's server on 127.0.0.1, reached through a TCP proxy that
can cut the connection), injects one randomized fault, recovers the way a user would (the same
command again), and then checks:

- **no lost commit**: the recovery resumed from the newest commit that was intact when it started
  (never from an older one), and every commit left in the store verifies;
- **right export**: the final export is the uninterrupted run's (same weights, to the bit);
- **one writer**: every commit and the export were written under a single lease generation
  after the fault, and a second writer was refused.

Faults: kill -9 of the command at a random time (mid-step, mid-upload, mid-commit); kill -9 inside
an upload; kill -9 of one Ray Train worker (a 2-worker ZeRO-2 job on a local Ray cluster) or of
the Ray driver; a random byte flipped, a file truncated or deleted in a random committed object
(checkpoint or export); store outages of random length; a second writer started at a random
time; a writer paused (SIGSTOP) past its lease and another taking over; a writer paused right
before it publishes a commit (its lease just checked) until another took over and finished, then
let go (``paused_publish``: its late manifest must count for nothing); rank markers of a crashed
attempt planted where the next attempt commits (``stale_markers``, a 2-worker Ray job).

A fourth check: **no commit by a lost holder**: no manifest that readers accept was written by a
lease generation after it was taken over.

    python bench/faults.py --scenarios 100            # about an hour on 2 cores
    python bench/faults.py --scenarios 6 --kinds outage,second_writer

The last line printed is the tally as JSON.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ddm.store.store import Store  # noqa: E402

BUCKET = "faults"
JOB = "experts/00"
STEPS, EVERY = 24, 4
TRAIN = [
    "partition=0",
    "global_batch_size=16",
    "log_every=2",
    "seed=3",
    f"steps={STEPS}",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep=3",
]
RAY = ["ray.num_workers=2", "ray.max_failures=2", "engine.zero_stage=2"]
TTL_S = 10  # lease ttl for every run of the campaign (short, so takeovers are quick)
KINDS = {  # kind -> weight in a random campaign
    "kill_command": 5,
    "kill_upload": 2,
    "damage": 4,
    "damage_export": 1,
    "outage": 3,
    "second_writer": 2,
    "paused_writer": 1,
    "kill_ray_worker": 1,
    "kill_ray_driver": 1,
    "paused_publish": 2,
    "stale_markers": 1,
}


# --- a TCP proxy in front of the S3 server: cutting it is an outage --------------------------------


class Proxy:
    """Forwards 127.0.0.1:<port> to the S3 server. ``down()`` resets every open connection and,
    until ``up()``, every new one (clients see resets, as when a server or a link dies); it keeps
    listening, so coming back never depends on the port being free again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._down = False
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def up(self) -> None:
        self._down = False

    def down(self) -> None:
        self._down = True
        with self._lock:
            for c in list(self._conns):
                _reset(c)
            self._conns.clear()

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with self._lock:
                    self._conns.discard(s)
                try:
                    s.close()
                except OSError:
                    pass


# --- running the job --------------------------------------------------------------------------------


class Env:
    def __init__(self, workdir: str):
        from moto.server import ThreadedMotoServer

        self.workdir = workdir
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.proxy = Proxy((host, port))
        self.direct = f"http://{host}:{port}"  # the harness's own view: never cut
        self.vars = {
            "AWS_ACCESS_KEY_ID": "faults",
            "AWS_SECRET_ACCESS_KEY": "faults",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.proxy.port}",
            "DDM_LEASE_TTL_S": str(TTL_S),
            "DDM_SCRATCH_DIR": os.path.join(workdir, "scratch"),
            "RAY_AUTH_MODE": "disabled",  # a private local cluster
        }
        os.makedirs(self.vars["DDM_SCRATCH_DIR"], exist_ok=True)
        os.environ.update({k: v for k, v in self.vars.items() if k.startswith("AWS_")})
        os.environ["AWS_ENDPOINT_URL"] = self.direct
        import s3fs

        self.fs = s3fs.S3FileSystem(endpoint_url=self.direct, skip_instance_cache=True)
        self.fs.mkdir(BUCKET)
        self.ray_address: str | None = None

    def store(self, prefix: str) -> Store:
        return Store(f"s3://{BUCKET}/{prefix}", skip_instance_cache=True)

    def child_env(self, extra: dict | None = None) -> dict:
        drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS")
        return {**{k: v for k, v in os.environ.items() if k not in drop}, **self.vars, **(extra or {})}

    def command(self, prefix: str, ray: bool, *extra: str) -> list[str]:
        url = f"store=s3://{BUCKET}/{prefix}"
        if ray:
            return [
                sys.executable,
                "-m",
                "ddm.cli",
                "train",
                "expert",
                "--address",
                self.ray_address,
                url,
                *TRAIN,
                *RAY,
                *extra,
            ]
        return [sys.executable, "-m", "ddm.train", url, *TRAIN, *extra]

    def start(self, prefix: str, ray: bool = False, extra: tuple = (), env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{prefix.replace('/', '_')}.log"), "a")
        return subprocess.Popen(
            self.command(prefix, ray, *extra),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self.child_env(env),
            cwd=ROOT,
            start_new_session=True,
        )

    def run(self, prefix: str, ray: bool = False, extra: tuple = (), env: dict | None = None, timeout: float = 600):
        p = self.start(prefix, ray, extra, env)
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out

    def log_tail(self, prefix: str, n: int = 2000) -> str:
        with open(os.path.join(self.workdir, f"{prefix.replace('/', '_')}.log")) as f:
            return f.read()[-n:]

    def fresh(self, prefix: str) -> None:
        """A new store prefix holding the prepared data and partitions."""
        for name in ("data", "partitions"):
            self.fs.copy(f"{BUCKET}/base/{name}", f"{BUCKET}/{prefix}/{name}", recursive=True)

    def start_ray(self) -> None:
        """A local Ray cluster of its own (a head in its own session, killed at the end)."""
        port = free_port()
        temp = f"/tmp/ddm-faults-{os.getpid()}"  # short: Ray's socket paths have a length limit
        cmd = [
            "ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
        ]  # fmt: skip
        log = open(os.path.join(self.workdir, "ray-head.log"), "ab")
        self.ray_head = subprocess.Popen(
            cmd, env=self.child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ray_address = f"127.0.0.1:{port}"
        probe = [sys.executable, "-c", f"import ray; ray.init(address={self.ray_address!r}); ray.shutdown()"]
        deadline = time.monotonic() + 120
        while subprocess.run(probe, env=self.child_env(), capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.ray_head.poll() is not None:
                raise SystemExit(f"the Ray head did not start; see {self.workdir}/ray-head.log")
            time.sleep(2)

    def close(self) -> None:
        if self.ray_address:
            try:
                os.killpg(self.ray_head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proxy.close()
        self.server.stop()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dead peer or link looks to the other side."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed(store: Store) -> list[int]:
    run = store.child(f"{JOB}/checkpoints")
    return sorted(int(n[5:]) for n in run.list("") if n.startswith("step_") and run.is_committed(n))


def intact(store: Store) -> list[int]:
    """Committed checkpoints whose every file verifies."""
    run = store.child(f"{JOB}/checkpoints")
    good = []
    for step in committed(store):
        try:
            run.verify(f"step_{step:07d}")
            good.append(step)
        except Exception:  # noqa: BLE001 - any unreadable commit
            pass
    return good


def export_sha(store: Store) -> str | None:
    run = store.child(JOB)
    try:
        run.verify("export")
        return hashlib.sha256(run.read_bytes("export/model.safetensors")).hexdigest()
    except Exception:  # noqa: BLE001
        return None


def summary_of(out: str) -> dict | None:
    """The JSON object a training command prints last (one line, or indented over several)."""
    lines = (out or "").strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return None


def wait_until(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def kill_tree(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


# --- scenarios --------------------------------------------------------------------------------------


class Scenario:
    """One fault and its recovery; ``outcome`` collects what the checks found."""

    def __init__(self, env: Env, kind: str, index: int, rng: random.Random, refs: dict):
        self.env, self.kind, self.rng, self.refs = env, kind, rng, refs
        self.prefix = f"s{index:03d}-{kind}"
        self.ray = kind.startswith("kill_ray") or kind == "stale_markers"
        self.store = env.store(self.prefix)
        self.detail: dict = {}
        self.expected_resume: int | None = None  # the newest intact commit when recovery starts

    def recover(self, tries: int = 3) -> dict | None:
        """Run the same command until it succeeds (a user re-running after a failure)."""
        self.expected_resume = max(intact(self.store), default=None)
        for _ in range(tries):
            rc, out = self.env.run(self.prefix, self.ray)
            if rc == 0:
                return summary_of(out)
            self.detail.setdefault("recovery_failures", []).append(rc)
            time.sleep(TTL_S + 1)  # e.g. a lease of a killed holder on another pid namespace
            self.expected_resume = max(intact(self.store), default=None)
        return None

    def check(self, final: dict | None) -> dict:
        ref = self.refs["ray" if self.ray else "plain"]
        sha = export_sha(self.store)
        resumed = (final or {}).get("startup", {}).get("resumed_from")
        lost = final is not None and self.expected_resume is not None and (resumed or 0) < self.expected_resume
        left = committed(self.store)
        broken_left = sorted(set(left) - set(intact(self.store)))
        writers = set()
        for step in sorted(set(left) - set(broken_left)):  # a damaged commit recovery skipped may stay
            writers.add(
                self.store.child(f"{JOB}/checkpoints").manifest(f"step_{step:07d}").get("writer", {}).get("lease")
            )

        if sha is not None:
            writers.add(self.store.child(JOB).manifest("export").get("writer", {}).get("lease"))
        return {
            "commits_by_lost_holder": self.commits_by_lost_holder(),
            "kind": self.kind,
            "prefix": self.prefix,
            "finished": final is not None and final.get("step") == STEPS,
            "export_ok": sha == ref,
            "lost_commit": bool(lost),
            "resumed_from": resumed,
            "expected_resume": self.expected_resume,
            "broken_commits_left": broken_left,
            "lease_generations": sorted(w for w in writers if w is not None),
            **self.detail,
        }

    def commits_by_lost_holder(self) -> int:
        """Manifests that readers accept, written by a lease generation after the next one took over
        (the manifest's object is newer than the next generation's record)."""
        run = self.store.child(JOB)
        leases = sorted(n for n in self.store.list(f"leases/{JOB}") if len(n) == 13 and n.endswith(".json"))
        taken = {
            int(n[:8]): self.env.fs.info(f"{BUCKET}/{self.prefix}/leases/{JOB}/{n}")["LastModified"] for n in leases
        }
        dirs = [f"checkpoints/{n}" for n in run.list("checkpoints") if n.startswith("step_")] + ["export"]
        count = 0
        for d in dirs:
            if not run.exists(f"{d}/MANIFEST.json"):
                continue
            try:
                accepted = run.manifest(d)  # what readers take: MANIFEST.json or a later holder's copy
            except Exception:  # noqa: BLE001 - refused: no commit at all
                continue
            generation = accepted.get("writer", {}).get("lease")
            main = run.read_json(f"{d}/MANIFEST.json").get("writer", {}).get("lease")
            name = "MANIFEST.json" if main == generation else f".MANIFEST.{generation:08d}.json"
            later = [t for g, t in taken.items() if generation is not None and g > generation]
            published = self.env.fs.info(f"{BUCKET}/{self.prefix}/{JOB}/{d}/{name}")["LastModified"]
            if later and published > min(later):
                count += 1  # a reader took a late write for a commit
        return count

    def run(self) -> dict:
        self.env.fresh(self.prefix)
        final = getattr(self, self.kind)()
        return self.check(final)

    # each returns the summary of the final, successful run (None if recovery failed)

    def _strike_time(self, p: subprocess.Popen, ray: bool) -> str | None:
        """Wait for a random moment of the run ``p``: mostly inside the training loop (after its
        first progress record, uniformly over the loop's length), sometimes during start-up.
        None if the run ended first."""
        startup = self.refs["startup_ray" if ray else "startup"]
        loop = self.refs["total_ray" if ray else "total"] - startup
        t0 = time.monotonic()
        if self.rng.random() < 0.2:
            delay = self.rng.uniform(0.3, 1.0) * startup
            ended = not wait_until(lambda: p.poll() is not None, delay)
            return f"{delay:.1f}s into start-up" if ended else None
        progress = f"{JOB}/progress.json"
        wait_until(lambda: p.poll() is not None or self.store.exists(progress), 600)
        delay = self.rng.uniform(0, loop)
        if wait_until(lambda: p.poll() is not None, delay):
            return None
        return f"{time.monotonic() - t0:.1f}s (loop +{delay:.1f}s)"

    def _kill_at_random_time(self, ray: bool) -> dict | None:
        p = self.env.start(self.prefix, ray)
        when = self._strike_time(p, ray)
        if when is None:
            self.detail["fault"] = "none: finished first"
        else:
            kill_tree(p)
            self.detail["fault"] = f"kill -9 at {when}"
        p.wait()
        return self.recover()

    def kill_command(self) -> dict | None:
        return self._kill_at_random_time(ray=False)

    def kill_ray_driver(self) -> dict | None:
        return self._kill_at_random_time(ray=True)

    def kill_upload(self) -> dict | None:
        step = self.rng.choice(range(EVERY, STEPS + 1, EVERY))
        once = os.path.join(self.env.workdir, f"{self.prefix}.once")
        rc, _ = self.env.run(self.prefix, env={"DDM_FAULT": f"upload:{step}", "DDM_FAULT_ONCE": once})
        self.detail["fault"] = f"kill -9 inside the upload of step {step} (rc {rc})"
        return self.recover()

    def kill_ray_worker(self) -> dict | None:
        import psutil

        p = self.env.start(self.prefix, ray=True)
        when = self._strike_time(p, ray=True)
        victim = None
        if when is not None:
            workers = [
                q for q in psutil.process_iter(["cmdline", "name"])
                if "RayTrainWorker" in " ".join(q.info["cmdline"] or []) + (q.info["name"] or "")
            ]  # fmt: skip
            if workers:
                victim = self.rng.choice(workers)
                try:
                    victim.kill()
                except psutil.NoSuchProcess:
                    victim = None
        self.detail["fault"] = f"kill -9 of a Ray Train worker at {when}" if victim else "none: no worker found"
        self.expected_resume = max(intact(self.store), default=None)  # Ray restarts the workers in the same command
        out, _ = p.communicate(timeout=900)
        if p.returncode == 0:
            return summary_of(out)
        self.detail["ray_restart_failed"] = p.returncode
        return self.recover()

    def _train_to_random_commit(self) -> None:
        step = self.rng.choice(range(EVERY + 1, STEPS + 1))  # a kill after at least one commit
        once = os.path.join(self.env.workdir, f"{self.prefix}.once")
        self.env.run(self.prefix, env={"DDM_FAULT": f"step:{step}", "DDM_FAULT_ONCE": once})

    def _damage(self, folder: str) -> str:
        root = self.store.path(folder)  # every file below it (a checkpoint's portable/ folder too)
        files = sorted(p[len(root) + 1 :] for p in self.store.fs.find(root) if not os.path.basename(p).startswith("."))
        name = self.rng.choice(files)
        path = f"{folder}/{name}"
        data = self.store.read_bytes(path)
        how = self.rng.choice(["flip", "truncate", "delete"])
        if how == "flip" and data:
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1 :]
            self.store.write_bytes(path, data)
        elif how == "truncate" and data:
            self.store.write_bytes(path, data[: self.rng.randrange(len(data))])
        else:
            how = "delete"
            self.store.delete(path)
        return f"{how} {path}"

    def damage(self) -> dict | None:
        self._train_to_random_commit()
        steps = committed(self.store)
        step = self.rng.choice(steps)
        self.detail["fault"] = self._damage(f"{JOB}/checkpoints/step_{step:07d}")
        return self.recover()

    def damage_export(self) -> dict | None:
        self.env.run(self.prefix)
        self.detail["fault"] = self._damage(f"{JOB}/export")
        return self.recover()

    def outage(self) -> dict | None:
        length = self.rng.choice([self.rng.uniform(0.5, 5), self.rng.uniform(5, 40)])
        p = self.env.start(self.prefix)
        when = self._strike_time(p, ray=False)
        if when is None:
            self.detail["fault"] = "none: finished first"
        else:
            self.env.proxy.down()
            time.sleep(length)
            self.env.proxy.up()
            self.detail["fault"] = f"store outage of {length:.1f}s at {when}"
        out, _ = p.communicate(timeout=900)
        self.detail["survived"] = p.returncode == 0
        if p.returncode == 0:
            return summary_of(out)
        return self.recover()

    def second_writer(self) -> dict | None:
        """A second command for the same job, at a random moment, with the same settings or another
        lr. It must be refused while the first holds the lease (exit 3; another lr may also be refused
        as a settings change, exit 2); once the first released it, it may run (it resumes the finished job)."""
        # Both pay the same start-up before they ask for the lease: a start within the first third of
        # the first's run makes the second ask while the first holds it (or, rarely, win the race).
        delay = self.rng.uniform(0, 0.35 * self.refs["total"])
        extra = self.rng.choice([(), ("lr=0.0003",)])
        first = self.env.start(self.prefix)
        time.sleep(delay)
        rc, _ = self.env.run(self.prefix, extra=extra)
        out, _ = first.communicate(timeout=900)
        self.detail["fault"] = f"second writer ({'lr 3e-4' if extra else 'same settings'}) at {delay:.1f}s: rc {rc}"
        admitted_while_live = False
        if rc == 0:  # it ran: only allowed if the first had released its lease (its work done) by then
            from ddm.store.lease import read_record

            records = sorted(int(n[:8]) for n in self.store.list(f"leases/{JOB}") if len(n) == 13)
            newest = read_record(self.store, JOB, records[-1])
            before = read_record(self.store, JOB, records[-2]) if len(records) > 1 else {}
            released_at = before["renewed_at"] if before.get("released") else float("inf")
            admitted_while_live = newest["started_at"] < released_at
        self.detail["second_refused"] = not admitted_while_live
        self.expected_resume = None
        return summary_of(out) if first.returncode == 0 else self.recover()

    def paused_writer(self) -> dict | None:
        step = self.rng.choice(range(EVERY + 1, STEPS))
        final = self._stopped_past_the_lease(f"step:{step}")
        self.detail["fault"] = f"SIGSTOP at step {step} past the lease ttl; resumed after the takeover"
        return final

    def _stopped_past_the_lease(self, point: str) -> dict | None:
        """Run the job until the fault ``point``, stop its whole process there (its lease renewals
        too) past the lease's ttl while another command takes over and finishes, then let it go:
        it must stop (exit 3). Returns the taker's summary."""
        once = os.path.join(self.env.workdir, f"{self.prefix}.once")
        first = self.env.start(
            self.prefix, env={"DDM_FAULT": point, "DDM_FAULT_ACTION": "pause", "DDM_FAULT_ONCE": once}
        )
        if not wait_until(lambda: os.path.exists(once) or first.poll() is not None, 300):
            kill_tree(first)
        os.killpg(first.pid, signal.SIGSTOP)
        open(once + ".go", "w").close()
        time.sleep(TTL_S + 1)
        final = self.recover()
        os.killpg(first.pid, signal.SIGCONT)
        first.communicate(timeout=300)
        self.detail["paused_writer_refused"] = first.returncode == 3
        return final

    def paused_publish(self) -> dict | None:
        """The writer stops right before publishing its n-th commit (checkpoint or export), after its
        last lease check; another command takes the lease over and finishes the job; then the first
        goes on and publishes. Its manifest must not count as a commit, and it must stop (exit 3)."""
        n = self.rng.randrange(2, STEPS // EVERY + 2)  # a checkpoint after the first, or the export
        final = self._stopped_past_the_lease(f"publish:{n}")
        self.detail["fault"] = f"paused before publishing commit {n} past the lease ttl; let go after the takeover"
        if not self.store.child(JOB).is_committed("export") or export_sha(self.store) is None:
            # Its late manifest replaced the new holder's export: readers ignore it, the job is unfinished
            # again, and the user's next run writes the export again.
            self.detail["late_export_rerun"] = True
            final = self.recover() or final
        return final

    def stale_markers(self) -> dict | None:
        """A 2-worker Ray job whose driver is killed at a random time; rank 1's markers of that
        attempt, with other digests, planted in the folders of every step the next attempt commits.
        Rank 0 must commit from this attempt's markers only: every commit afterwards verifies."""
        p = self.env.start(self.prefix, ray=True)
        when = self._strike_time(p, ray=True)
        kill_tree(p)
        time.sleep(3)  # Ray tears the job's workers down once its driver is gone
        ckpts = self.store.child(f"{JOB}/checkpoints")
        last = max(committed(self.store), default=0)
        planted = []
        for future in range(last + EVERY, STEPS + 1, EVERY):
            tag = f"step_{future:07d}"
            garbage = b"an earlier attempt's bytes"
            ckpts.write_bytes(f"{tag}/rank001.json", garbage)
            entry = {"size": len(garbage), "sha256": hashlib.sha256(garbage).hexdigest()}
            marker = {"files": {"rank001.json": entry}, "attempt": "crashed", "lease": 1, "world_size": 2}
            ckpts.write_json(f"{tag}/.rank001.done", marker)
            planted.append(future)
        self.detail["fault"] = f"driver killed at {when} (last commit {last}); stale rank-1 markers at {planted}"
        return self.recover()


# --- the campaign -------------------------------------------------------------------------------------


def prepare(env: Env) -> dict:
    """The prepared data and the uninterrupted runs' exports (single process and Ray)."""
    from ddm.data.ingest import IngestConfig, ingest
    from ddm.data.partition import PartitionConfig, partition

    base = env.store("base")
    ingest(IngestConfig(shard_size=500), base)
    partition(PartitionConfig(num_partitions=2, num_fine=64), base)
    refs = {}
    for ray in (False, True):
        if ray and not env.ray_address:
            continue
        prefix = "reference-ray" if ray else "reference"
        env.fresh(prefix)
        t0 = time.monotonic()
        rc, out = env.run(prefix, ray)
        if rc != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{env.log_tail(prefix)}")
        total = time.monotonic() - t0
        s = summary_of(out)
        startup = total - s["loop_s"]
        key = "ray" if ray else "plain"
        refs[key] = export_sha(env.store(prefix))
        refs["total_ray" if ray else "total"], refs["startup_ray" if ray else "startup"] = total, startup
    return refs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every-kind", action="store_true", help="one scenario of each kind, in order")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers (1-based) of the seeded plan to run")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: " + ", ".join(KINDS))
    ap.add_argument("--workdir", default=None, help="logs of every run (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="also write every scenario's result here (JSON lines)")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        ap.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ddm-faults-")
    os.makedirs(workdir, exist_ok=True)
    rng = random.Random(args.seed)
    if args.every_kind:
        plan = kinds
    else:
        plan = rng.choices(kinds, weights=[KINDS[k] for k in kinds], k=args.scenarios)
    seeds = [rng.random() for _ in plan]  # scenario i's randomness, the same whichever are run
    only = {int(n) - 1 for n in args.only.split(",") if n}
    selected = [i for i in range(len(plan)) if not only or i in only]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server: no line per request
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the Ray head and the servers
    env = Env(workdir)
    t_start = time.monotonic()
    results = []
    try:
        if any(plan[i].startswith("kill_ray") or plan[i] == "stale_markers" for i in selected):
            env.start_ray()
        refs = prepare(env)
        print(f"references: {json.dumps(refs)}  (logs in {workdir})", flush=True)
        for i in selected:
            kind = plan[i]
            t0 = time.monotonic()
            try:
                r = Scenario(env, kind, i, random.Random(seeds[i]), refs).run()
            except Exception as e:  # noqa: BLE001 - the harness itself failed: count it, go on
                r = {"kind": kind, "prefix": f"s{i:03d}-{kind}", "harness_error": f"{type(e).__name__}: {e}"}
            r["seconds"] = round(time.monotonic() - t0, 1)
            results.append(r)
            ok = r.get("finished") and r.get("export_ok") and not r.get("lost_commit")
            print(f"[{i + 1}/{len(plan)}] {'ok  ' if ok else 'FAIL'} {json.dumps(r)}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    finally:
        env.close()
    tally = {
        "scenarios": len(results),
        "by_kind": dict(collections.Counter(r["kind"] for r in results)),
        "faults_injected": sum(not str(r.get("fault", "none")).startswith("none") for r in results),
        "finished": sum(bool(r.get("finished")) for r in results),
        "wrong_exports": sum(not r.get("export_ok") for r in results),
        "lost_commits": sum(bool(r.get("lost_commit")) for r in results),
        "broken_commits_left": sum(bool(r.get("broken_commits_left")) for r in results),
        "second_writers_admitted": sum(r.get("second_refused") is False for r in results),
        "paused_writers_not_stopped": sum(r.get("paused_writer_refused") is False for r in results),
        "commits_by_lost_holder": sum(r.get("commits_by_lost_holder", 0) for r in results),
        "outages_survived_in_place": sum(bool(r.get("survived")) for r in results if r["kind"] == "outage"),
        "harness_errors": sum("harness_error" in r for r in results),
        "minutes": round((time.monotonic() - t_start) / 60, 1),
    }
    print(json.dumps(tally))
    bad = tally["wrong_exports"] + tally["lost_commits"] + tally["second_writers_admitted"] + tally["harness_errors"]
    bad += tally["commits_by_lost_holder"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
