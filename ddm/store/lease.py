"""One writer per folder: leases held in the store itself.

Before a job (or an ingest, a partition, a run, a submission) writes, it takes the lease of what it
writes: an object ``leases/<folder>/<generation>.json`` created atomically (S3's ``If-None-Match``
conditional PUT; a hard link on local files, which fails if the name exists), naming the holder (a
random id), the command, host, pid and start time. The newest generation is the lease; taking it
over creates the next generation, so two would-be holders cannot both win, and nobody ever
overwrites another holder's record.

- **Renewed while held.** The holder writes ``<generation>.renewed.json`` every ``ttl/4`` seconds;
  the generation's own record is never rewritten, so its object time (the store's clock) is the
  moment of the takeover, by which readers refuse a manifest a lost holder published later
  (``Store.manifest``).
- **Refused while live.** A second writer is refused with an error naming the holder and when its
  lease expires. A lease may be taken once it expired (not renewed for ``ttl`` seconds), at once
  when its holder was on this machine and its process is gone, or with ``force``.
- **Fenced writes.** Every process of the job (the holder and, e.g., Ray Train workers, which get the
  lease's ``Token``) writes through a ``fenced`` store: before each commit, and at most every few
  seconds before other writes, it checks that no newer generation exists and that its lease was
  renewed within ``0.8 * ttl``. A writer that lost its lease (taken over; or paused, partitioned or
  stuck for longer than that) raises ``LeaseLost`` before it writes, so it never commits after
  another writer took over. A taker waits the full ``ttl``; the margin between the two covers the
  time from a check to the write it guards.

``ttl`` is 120 s, or ``$DDM_LEASE_TTL_S``. Clocks of the machines that share a store should agree
to well within ``0.2 * ttl`` (NTP does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Iterator

from ddm.store import layout
from ddm.store.errors import LeaseHeld, LeaseLost
from ddm.store.store import Store

log = logging.getLogger("ddm.lease")

GENERATION_RE = re.compile(r"^(\d{8})\.json$")
RENEWED = ".renewed.json"  # beside each generation's record: its renewals and release
FENCE_MARGIN = 0.8  # a holder stops writing once its lease is this old (as a fraction of ttl)
RECHECK_S = 2.0  # plain writes re-check the lease at most this often; commits always do


def default_ttl() -> float:
    ttl = float(os.environ.get("DDM_LEASE_TTL_S", 120))
    if ttl <= 0:
        raise ValueError(f"DDM_LEASE_TTL_S={ttl} must be positive (seconds)")
    return ttl


def machine_id() -> str:
    """This host, its boot and its pid namespace: processes with the same id see the same pids."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _process_gone(record: dict) -> bool:
    """The holder ran on this machine and its process no longer exists."""
    if record.get("machine") != machine_id():
        return False
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, ValueError, KeyError):
        return False
    return False


def describe(record: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started_at", 0)))
    return (
        f"`{record.get('what', '?')}` (holder {str(record.get('holder', '?'))[:8]}, pid {record.get('pid', '?')} on "
        f"{record.get('host', '?')}, since {started}, renewed {now - record.get('renewed_at', 0):.0f} s ago)"
    )


@dataclasses.dataclass(frozen=True)
class Token:
    """What a process needs to write under a lease another process holds (plain data: it travels
    to Ray workers)."""

    store: str
    folder: str
    generation: int
    holder: str
    ttl_s: float

    @property
    def record(self) -> str:
        return f"{layout.lease_dir(self.folder)}/{self.generation:08d}.json"


def read_record(store: Store, folder: str, generation: int) -> dict:
    """A generation's record with its latest renewal (or release) laid over it."""
    base = f"{layout.lease_dir(folder)}/{generation:08d}"
    record = store.read_json(f"{base}.json")
    if not isinstance(record, dict):
        raise ValueError(f"{store.url}/{base}.json is not a lease record")
    try:
        renewed = store.read_json(f"{base}{RENEWED}")
    except FileNotFoundError:
        return record
    return {**record, **{k: renewed[k] for k in ("renewed_at", "released") if k in renewed}}


def _generations(store: Store, folder: str) -> list[int]:
    return sorted(int(m.group(1)) for n in store.list(layout.lease_dir(folder)) if (m := GENERATION_RE.match(n)))


class Fence:
    """Checks, before writes, that the lease ``token`` names is still this job's."""

    def __init__(self, store: Store, token: Token):
        self.store, self.token = store, token
        self._checked = -float("inf")
        self._lost: str | None = None
        # Recorded in each manifest: readers refuse one published after this generation was taken over.
        self.writer = {"lease": token.generation, "holder": token.holder, "folder": token.folder}
        self.safe_until = -float("inf")  # wall clock: when this writer must stop (renewed_at + margin)

    def __call__(self, what: str, always: bool = False) -> None:
        if self._lost:
            raise LeaseLost(self._lost)
        if not always and time.monotonic() - self._checked < RECHECK_S:
            return
        t = self.token
        newest = max(_generations(self.store, t.folder), default=0)
        reason = None
        if newest > t.generation:
            other = read_record(self.store, t.folder, newest)
            reason = f"taken over by {describe(other)}"
        else:
            record = read_record(self.store, t.folder, t.generation)
            age = time.time() - float(record["renewed_at"])
            self.safe_until = float(record["renewed_at"]) + FENCE_MARGIN * t.ttl_s
            if record.get("released"):
                reason = "released by its holder"
            elif age > FENCE_MARGIN * t.ttl_s:
                reason = f"not renewed for {age:.0f} s (ttl {t.ttl_s:.0f} s): its holder was paused, cut off or stopped"
        if reason:
            self._lost = (
                f"lost the lease on {self.store.url}/{t.folder} ({reason}); not writing {what}. Another writer may "
                "own this folder now: check `ddm status` / the lease files, then re-run the command to resume"
            )
            raise LeaseLost(self._lost)
        self._checked = time.monotonic()


class Lease:
    """The lease on ``folder`` of ``store``, taken by ``acquire`` and kept by a renewing thread."""

    def __init__(self, store: Store, folder: str, what: str, ttl_s: float | None = None):
        self.store, self.folder, self.what = store, folder.strip("/"), what
        self.ttl_s = default_ttl() if ttl_s is None else float(ttl_s)
        self.holder = uuid.uuid4().hex
        self.token: Token | None = None
        self._record: dict = {}
        self._renewed = 0.0  # monotonic time of the last successful renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def acquire(self, force: bool = False, wait_s: float = 0.0) -> Token:
        """Take the lease; raise LeaseHeld while another live holder has it (waiting up to
        ``wait_s`` seconds for it to be released or expire)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._try_acquire(force)
            except LeaseHeld:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(self.ttl_s / 8, 5.0, max(0.0, deadline - time.monotonic())))

    def _try_acquire(self, force: bool) -> Token:
        gens = _generations(self.store, self.folder)
        current = gens[-1] if gens else 0
        if current:
            record = read_record(self.store, self.folder, current)
            age = time.time() - float(record.get("renewed_at", 0))
            live = not record.get("released") and age <= float(record.get("ttl_s", self.ttl_s))
            if live and _process_gone(record):
                log.warning("taking the lease on %s: its holder %s is no longer running", self.folder, describe(record))
            elif live and force:
                log.warning(
                    "--force: taking the lease on %s from %s; if it still runs, it stops before its next commit "
                    "and loses its work since its last commit",
                    self.folder,
                    describe(record),
                )
            elif live:
                expires = float(record.get("ttl_s", self.ttl_s)) - age
                options = (  # training commands can wait for the lease or take it
                    " (or wait with --lease-wait S), or take it now with --force (a holder that still runs then "
                    "stops before its next commit and loses its work since that commit)"
                    if str(record.get("what", "")).startswith("ddm train")
                    else ""
                )
                raise LeaseHeld(
                    f"{self.store.url}/{self.folder} is being written by {describe(record)}; two writers would mix "
                    f"their results, so this one is refused. If that process is gone, its lease expires in "
                    f"{max(expires, 0):.0f} s: re-run then{options}"
                )
            elif not record.get("released"):
                log.warning("taking over the expired lease on %s from %s", self.folder, describe(record))
        now = time.time()
        self._record = {
            "kind": "ddm.lease",
            "format_version": 1,
            "folder": self.folder,
            "generation": current + 1,
            "holder": self.holder,
            "what": self.what,
            "host": socket.gethostname(),
            "machine": machine_id(),
            "pid": os.getpid(),
            "started_at": now,
            "renewed_at": now,
            "ttl_s": self.ttl_s,
        }
        token = Token(self.store.url, self.folder, current + 1, self.holder, self.ttl_s)
        if not self.store.create_json(token.record, self._record):
            raise LeaseHeld(f"{self.store.url}/{self.folder}: another writer took the lease at the same moment")
        self._renewed = time.monotonic()
        self.token = token
        # Every generation's record stays (a few hundred bytes each): readers date late commits by
        # the next generation's record, so none may go.
        log.info("%s holds the lease on %s (generation %d)", self.what, self.folder, current + 1)
        return token

    def renew(self) -> None:
        """Rewrite this holder's record with the time now, unless the lease was lost."""
        assert self.token is not None
        if self.lost:
            return
        if max(_generations(self.store, self.folder), default=0) > self.token.generation:
            self.lost = "taken over"
        elif time.monotonic() - self._renewed > FENCE_MARGIN * self.ttl_s:
            self.lost = f"not renewed for {time.monotonic() - self._renewed:.0f} s"
        if self.lost:
            log.error("the lease on %s was lost (%s): this job writes nothing more", self.folder, self.lost)
            return
        now = time.time()
        self.store.write_json(self.token.record.replace(".json", RENEWED), {"renewed_at": now})
        self._record["renewed_at"] = now
        self._renewed = time.monotonic()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a store hiccup: try again next period
                log.warning("could not renew the lease on %s: %s", self.folder, e)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.folder}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the record released, so the next writer need not wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.token is None or self.lost:
            return
        try:
            if max(_generations(self.store, self.folder), default=0) == self.token.generation:
                self.store.write_json(
                    self.token.record.replace(".json", RENEWED), {"released": True, "renewed_at": time.time()}
                )
        except Exception as e:  # noqa: BLE001 - the lease then expires on its own
            log.warning("could not release the lease on %s (it expires in %.0f s): %s", self.folder, self.ttl_s, e)


def fenced(store: Store, token: Token) -> Store:
    """``store`` with every write checked against the lease ``token`` names (for the processes of a
    job other than the holder, e.g. Ray Train workers)."""
    return store.with_fence(Fence(store, token))


@contextlib.contextmanager
def holding(
    store: Store, folder: str, what: str, force: bool = False, wait_s: float = 0.0
) -> Iterator[tuple[Store, Token]]:
    """Hold the lease on ``folder`` for the block: yields a store whose writes are fenced by it, and
    the token other processes of the job need (``Store.fenced``)."""
    lease = Lease(store, folder, what)
    token = lease.acquire(force=force, wait_s=wait_s)
    lease.start()
    try:
        yield fenced(store, token), token
    finally:
        lease.release()
