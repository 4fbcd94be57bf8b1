"""Full-state checkpoints in the store, uploaded in the background, committed by a manifest.

A checkpoint of step n lives at ``{run}/checkpoints/step_{n:07d}/``, safetensors and JSON only:

  rank{r:03d}.safetensors     per rank: EMA weights and RNG states
  rank{r:03d}.json            per rank: data position, step, loss
  portable/rank{r:03d}.safetensors  per rank: its pieces of the fp32 weights and Adam's moments by
                              parameter name (``ddm.checkpoint.reshard``): what every resume restores from, on
                              this worker count or another
  .rank{r:03d}.done           per rank: sizes + sha256 of what that rank uploaded, and the attempt
                              and lease generation it was written under
  MANIFEST.json               written last by rank 0, once every rank of this attempt is done

Nothing in a checkpoint is a pickle, and nothing read from one runs code: the store is shared with
other islands (docs/store.md, the trust model). DeepSpeed's own checkpoint files are pickles, so ddm
never writes them; commits of ddm before format 3 hold only those (``ddm.checkpoint.legacy``).

Each rank snapshots into local scratch, then a background thread uploads while training goes on; the
store is the rendezvous of the commit. The newest readable commit is the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ddm.checkpoint.legacy import DEEPSPEED_FILE, load_deepspeed_files, sanitize_deepspeed_files
from ddm.checkpoint.reshard import PORTABLE_DIR, check_portable, portable_name
from ddm.checkpoint.scratch import SCRATCH_PREFIX, scratch_root, sweep_stale_scratch
from ddm.core.faults import fault_hook as _fault_hook
from ddm.distributed.parallel import all_ranks
from ddm.store import ChecksumError, Store, StoreError
from ddm.store.layout import CHECKPOINTS, STEP_RE, committed_steps, safe_relpath, step_dir

log = logging.getLogger("ddm.checkpoint")

# 2: ddm 0.2's parameter layout (DiT output layers in FinalLayer). Commits without a version are 1.
# 3: the portable state beside DeepSpeed's files (resume on another worker count).
# 4: safetensors + JSON only (no DeepSpeed files); rank markers bound to the attempt.
FORMAT_VERSION = 4
# Names a commit may hold: ddm's own files (formats 3-4) and, before format 4, DeepSpeed's.
_DDM_FILE = re.compile(r"^(?:portable/)?rank\d{3,}\.(?:safetensors|json)$")


class IncompatibleCheckpoint(ValueError):
    """A readable commit that this job cannot restore (another world size, an older format)."""


@dataclass
class RankState:
    """What each rank saves beside the portable state: tensors (safetensors) and JSON."""

    tensors: dict[str, torch.Tensor]
    info: dict
    resharded_from: int | None = None  # the world size that wrote it, when it was not this job's
    own_pieces: bool = False  # restored from this rank's own portable pieces alone (same workers, same split)


class CheckpointManager:
    """Save, commit, prune and restore one rank's checkpoints of one job (``run``: its folder).

    ``min_format``: the oldest checkpoint format this job can restore; older commits are an error
    that says so (a router's optimizer state from ddm 0.1 follows another parameter order).

    ``portable(path)`` writes this rank's portable state (``ddm.checkpoint.reshard.save_portable``) into each
    checkpoint; ``reshard(paths, own_pieces)`` restores the engine from it: this rank's own file when
    the commit has this job's workers and ``layout`` (how ZeRO and ``ep_size`` split the state),
    else every rank's (on another worker count the MoE experts of rank r are the writer's rank
    ``r % ep_size``'s). ``attempt``: the id every rank of this attempt shares; with the lease
    generation of ``run``'s fence it binds the rank markers rank 0 commits from.
    """

    def __init__(
        self,
        run: Store,
        rank: int,
        world_size: int,
        keep_last: int = 3,
        commit_timeout_s: float = 600.0,
        min_format: int = 1,
        portable: Callable[[str], None] | None = None,
        reshard: Callable[[list[str], bool], None] | None = None,
        ep_size: int = 1,
        attempt: str | None = None,
        layout: str | None = None,
    ):
        self.store, self.rank, self.world_size = run.child(CHECKPOINTS), rank, world_size
        self.portable, self.reshard, self.ep_size, self.layout = portable, reshard, ep_size, layout
        self.attempt = attempt or uuid.uuid4().hex  # markers of a crashed attempt are never committed
        self.generation = getattr(getattr(run.fence, "token", None), "generation", None)
        self.last_committed: int | None = None  # rank 0: the newest step this manager committed
        self.keep_last, self.commit_timeout_s, self.min_format = keep_last, commit_timeout_s, min_format
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        root = scratch_root()
        sweep_stale_scratch(root or tempfile.gettempdir())
        # The pid in the name lets a later job on this host remove what a killed one left behind.
        self._scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-r{rank}-", dir=root)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._scratch, True)  # any exit but a kill

    # --- discovery --------------------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps whose directory has a manifest, oldest first (fresh listing, no cache)."""
        return committed_steps(self.store)

    # --- save -------------------------------------------------------------------------------
    def save(self, engine, step: int, rank_state: RankState, background: bool = True) -> float:
        """Snapshot now (this rank's state to local scratch), upload in the background.

        Returns the seconds training waited: for the previous upload, if it was still running, and
        for the snapshot (the device-to-host copy and the write to memory-backed scratch).
        """
        t0 = time.perf_counter()
        self.wait()  # at most one upload in flight; surfaces the previous one's failure
        tag = step_dir(step)
        local = os.path.join(self._scratch, tag)
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(os.path.join(local, PORTABLE_DIR))
        # The weights and the optimizer go in the portable state (safetensors), never in DeepSpeed's
        # pickled files: a resume restores from it on any worker count.
        self.portable(os.path.join(local, portable_name(self.rank)))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in rank_state.tensors.items()},
            os.path.join(local, f"rank{self.rank:03d}.safetensors"),
        )
        with open(os.path.join(local, f"rank{self.rank:03d}.json"), "w") as f:
            json.dump(rank_state.info, f, allow_nan=False)
        files = sorted(
            os.path.relpath(os.path.join(d, name), local) for d, _, names in os.walk(local) for name in names
        )
        if background:
            self._thread = threading.Thread(target=self._upload_guarded, args=(step, local, files), daemon=True)
            self._thread.start()
        else:
            self._upload(step, local, files)
        stall = time.perf_counter() - t0
        log.info("rank %d snapshot %s: training waited %.0f ms", self.rank, tag, 1000 * stall)
        return stall

    def _upload_guarded(self, step: int, local: str, files: list[str]) -> None:
        try:
            self._upload(step, local, files)
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e

    def _upload(self, step: int, local: str, files: list[str]) -> None:
        tag = step_dir(step)
        t0 = time.perf_counter()
        entries = {}
        for name in files:  # streamed: a rank's state of several GB is never read whole into memory
            entries[name] = self.store.put_file(os.path.join(local, name), f"{tag}/{name}")
            _fault_hook("upload", step, self.rank)
        marker = {"files": entries, "attempt": self.attempt, "lease": self.generation, "world_size": self.world_size}
        self.store.write_json(f"{tag}/.rank{self.rank:03d}.done", marker)
        shutil.rmtree(local, ignore_errors=True)
        if self.rank == 0:
            self._commit(step)
        log.info(
            "rank %d uploaded checkpoint %s (%d files) in %.1fs", self.rank, tag, len(files), time.perf_counter() - t0
        )

    def _commit(self, step: int) -> None:
        tag = step_dir(step)
        deadline = time.monotonic() + self.commit_timeout_s
        pending = {r: f"{tag}/.rank{r:03d}.done" for r in range(self.world_size)}
        known: dict[str, dict] = {}
        while pending:
            for r, m in list(pending.items()):
                marker = self._marker(m) if self.store.exists(m) else None
                if marker is not None:  # this attempt's: a crashed attempt's or another world size's waits
                    known.update(marker["files"])
                    del pending[r]
            if pending and time.monotonic() > deadline:
                raise StoreError(
                    f"checkpoint {tag}: ranks {sorted(pending)} did not finish uploading within "
                    f"{self.commit_timeout_s:.0f}s"
                )
            if pending:
                time.sleep(0.2)
        self.store.commit(
            tag,
            list(known),
            meta={
                "layout": self.layout,
                "kind": "ddm.checkpoint",
                "step": step,
                "world_size": self.world_size,
                "format_version": FORMAT_VERSION,
                "portable": any(n.startswith(f"{PORTABLE_DIR}/") for n in known),
            },
            known=known,
        )
        log.info("committed checkpoint %s", tag)
        self.last_committed = step
        self._prune(step)

    def _marker(self, rel: str) -> dict | None:
        """A rank's marker if this attempt wrote it (same attempt id, lease generation and world
        size), else None; a marker that does not parse counts as not written."""
        try:
            marker = self.store.read_json(rel)
        except (ValueError, FileNotFoundError):
            return None
        ours = {"attempt": self.attempt, "lease": self.generation, "world_size": self.world_size}
        if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in ours.items()):
            return None
        if not isinstance(marker.get("files"), dict):
            return None
        for name in marker["files"]:
            safe_relpath(name, f"{self.store.url}/{rel}")
        return marker

    def _prune(self, newest: int) -> None:
        """Keep the last ``keep_last`` commits; drop older ones and uncommitted leftovers below the newest."""
        committed = [s for s in self.committed_steps() if self.store.readable(step_dir(s))]
        doomed = set(committed[: -self.keep_last]) if self.keep_last > 0 else set()
        for name in self.store.list(""):
            m = STEP_RE.match(name)
            if not m:
                continue
            s = int(m.group(1))
            if s in doomed or (s < newest and s not in committed):
                self.store.delete(name, recursive=True)

    def wait(self) -> None:
        """Block until the in-flight upload is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # --- load -------------------------------------------------------------------------------
    def load_latest(self, engine) -> tuple[int, RankState] | None:
        """Restore the newest usable committed checkpoint into ``engine``; None when there is none.

        A commit that cannot be read for any reason (its manifest missing, truncated or invalid, a
        file missing or failing its checksum, rank state that does not deserialize, on any rank) is
        skipped with a warning naming it, for the one before; with no usable commit the job starts
        over, and says so. The ranks agree on every commit before any of them touches the engine,
        so all of them restore the same step. A readable commit this job cannot restore (another
        world size, an older format) is an error, never a silent start-over.
        """
        steps = self.committed_steps()
        for step in reversed(steps):
            try:
                staged, error = self._stage(step), None
            except IncompatibleCheckpoint:
                raise
            except Exception as e:  # noqa: BLE001 - whatever makes a commit unreadable, the one before may do
                staged, error = None, e
            if not all_ranks(staged is not None):
                reason = f"{type(error).__name__}: {error}" if error else "unreadable on another rank"
                log.warning(
                    "checkpoint %s/%s is unusable (%s); trying the commit before it",
                    self.store.url,
                    step_dir(step),
                    reason,
                )
                continue
            return step, self._restore(engine, step, staged)
        if steps:
            log.warning(
                "none of the %d commits in %s is usable: the job starts over from step 0", len(steps), self.store.url
            )
        return None

    def _stage(self, step: int) -> tuple[str, RankState]:
        """Verify a commit and bring what this rank restores from to local scratch, deserialised:
        all that can fail before the engine is touched. Every name in the manifest is checked before
        it touches a path, every file against its sha256 before it is read."""
        tag = step_dir(step)
        where = f"checkpoint {self.store.url}/{tag}"
        manifest = self.store.manifest(tag)
        version = manifest.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IncompatibleCheckpoint(f"{where} was written by a newer ddm (format {version}): upgrade this one")
        if version < self.min_format:
            raise IncompatibleCheckpoint(
                f"{where} was written by ddm 0.1, whose parameter order this job's optimizer "
                f"state cannot be restored in; delete {self.store.url} to train this job again from its start"
            )
        for name in manifest["files"]:
            safe_relpath(name, f"{where}/MANIFEST.json")
            if not (_DDM_FILE.match(name) or (version < 4 and DEEPSPEED_FILE.match(name))):
                raise ChecksumError(f"{where}/MANIFEST.json lists {name!r}, which no ddm checkpoint holds")
        written_by = manifest.get("world_size", self.world_size)
        if not isinstance(written_by, int) or written_by < 1:
            raise ChecksumError(f"{where}/MANIFEST.json: world_size {written_by!r} is not a worker count")
        local = os.path.join(self._scratch, "restore", tag)
        shutil.rmtree(local, ignore_errors=True)
        if manifest.get("portable"):
            return self._stage_portable(tag, manifest, local, written_by)
        if written_by != self.world_size:
            raise IncompatibleCheckpoint(
                f"{where} was written by {written_by} ranks; this job has {self.world_size}, and the checkpoint has "
                f"no portable state to reshard (written before ddm 0.3). Resume with {written_by} workers."
            )
        # Before format 3: DeepSpeed's files only. Each rank fetches (checked against the manifest
        # before anything is deserialised) the files every rank reads and its own.
        for name in manifest["files"]:
            if _owner(name) in (None, self.rank):
                self.store.get_verified(tag, name, os.path.join(local, name), manifest)
        sanitize_deepspeed_files(local)
        return local, self._rank_state(local, self.rank)

    def _stage_portable(self, tag: str, manifest: dict, local: str, written_by: int) -> tuple[str, RankState]:
        """Every rank's portable state, and the EMA, data position and step of the writer's rank whose
        state this rank continues: its own on the same worker count; on another, the rank whose MoE
        experts it holds."""
        if written_by % self.ep_size:
            raise IncompatibleCheckpoint(
                f"checkpoint {self.store.url}/{tag} was written by {written_by} ranks, not a multiple of this job's "
                f"moe.ep_size={self.ep_size}: MoE experts reshard only with the same ep_size"
            )
        source = self.rank if written_by == self.world_size else self.rank % self.ep_size
        # The same workers and split: each rank's own pieces go back where they came from (no rank
        # fetches or assembles the whole state); otherwise every rank's pieces are assembled.
        own = written_by == self.world_size and self.layout is not None and manifest.get("layout") == self.layout
        for name in manifest["files"]:
            if (
                name == portable_name(self.rank)
                or (name.startswith(f"{PORTABLE_DIR}/") and not own)
                or _owner(name) == source
            ):
                self.store.get_verified(tag, name, os.path.join(local, name), manifest)
                if name.startswith(f"{PORTABLE_DIR}/"):
                    check_portable(os.path.join(local, name))  # before the ranks agree on this commit
        state = self._rank_state(local, source)
        state.resharded_from = None if written_by == self.world_size else written_by
        state.own_pieces = own
        return local, state

    @staticmethod
    def _rank_state(local: str, rank: int) -> RankState:
        with open(os.path.join(local, f"rank{rank:03d}.safetensors"), "rb") as f:
            tensors = load_safetensors(f.read())
        with open(os.path.join(local, f"rank{rank:03d}.json")) as f:
            info = json.load(f)
        if not isinstance(info, dict):
            raise ChecksumError(f"rank{rank:03d}.json holds {type(info).__name__}, not a rank's state")
        return RankState(tensors, info)

    def _restore(self, engine, step: int, staged: tuple[str, RankState]) -> RankState:
        local, state = staged
        tag = step_dir(step)
        portable_dir = os.path.join(local, PORTABLE_DIR)
        if os.path.isdir(portable_dir):
            if self.reshard is None:
                raise IncompatibleCheckpoint(f"checkpoint {tag} holds portable state, and this job cannot restore it")
            paths = sorted(os.path.join(portable_dir, n) for n in os.listdir(portable_dir))
            self.reshard(paths, state.own_pieces)
            if state.resharded_from is not None:
                log.info(
                    "rank %d restored %s, written by %d ranks, resharded to %d",
                    self.rank,
                    tag,
                    state.resharded_from,
                    self.world_size,
                )
            shutil.rmtree(local, ignore_errors=True)
            return state
        load_deepspeed_files(engine, local, tag)  # before format 3: rewritten locally by _stage
        shutil.rmtree(local, ignore_errors=True)
        return state

    def close(self) -> None:
        """Wait for the last upload (raising its error), then remove the local scratch space."""
        try:
            self.wait()
        finally:
            self._cleanup()


# Files of one rank: DeepSpeed's ZeRO optimizer shards (by data-parallel rank, which is the rank
# here: ddm has no pipeline or tensor parallelism) and ddm's own per-rank state.
_OWNED = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_|^rank(\d+)\.")


def _owner(name: str) -> int | None:
    """The rank a checkpoint file belongs to; None for files every rank reads."""
    m = _OWNED.match(os.path.basename(name))
    return None if m is None else int(m.group(1) or m.group(2))
