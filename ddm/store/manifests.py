"""Committed directories: a ``MANIFEST.json`` written after the files it lists (sizes and sha256),
the only thing readers trust (``Manifests``, a part of ``ddm.store.Store``).

A manifest is a commit only if it parses, every name it lists is a safe relative path, and it was
published while its writer held the folder's lease: one published after the next lease
generation's record was created is a late write of a lost holder (``_refuse_late``). Every file a
reader uses is checked against its entry before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from typing import Callable, TypeVar

from ddm.store.errors import ChecksumError, NotCommittedError
from ddm.store.layout import LEASES_DIR, safe_relpath

MANIFEST = "MANIFEST.json"
T = TypeVar("T")


def _generation(name: str) -> int | None:
    """The generation of a lease record's name (``00000003.json``), None for any other name."""
    base = os.path.basename(name.rstrip("/"))
    return int(base[:8]) if len(base) == 13 and base.endswith(".json") and base[:8].isdigit() else None


def _copy_name(generation: int) -> str:
    return f".{MANIFEST[:-5]}.{generation:08d}.json"  # .MANIFEST.00000002.json


def _copy_generation(name: str) -> int | None:
    """The generation of a manifest's copy by its name, None for any other name."""
    prefix = f".{MANIFEST[:-5]}."
    rest = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(rest[:8]) if len(rest) == 13 and rest.endswith(".json") and rest[:8].isdigit() else None


def _mtime(info: dict) -> float | None:
    """An object's modification time in seconds from fsspec's ``info`` (local files, S3, memory)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


class Manifests:
    """Manifest reads and writes of a store (``url``, ``fs``, ``top``, ``fence``, ``_call``,
    ``open_write``, ``read_bytes``, ``exists``, ``path``, ``digest`` and ``get_file`` come from it)."""

    # --- manifests: committed directories ---------------------------------------------------
    def commit(
        self, rel_dir: str, files: list[str], meta: dict | None = None, known: dict[str, dict] | None = None
    ) -> dict:
        """Write ``rel_dir/MANIFEST.json`` listing ``files`` (relative to the dir) with sizes and
        sha256. Call after every file is written. Digests come from ``known`` (name -> {size,
        sha256}, computed by the writer from the bytes it uploaded) or are read back from the store.
        Under a lease the same manifest goes first to ``.MANIFEST.<generation>.json``: a late write of
        an earlier holder over MANIFEST.json then costs this commit nothing (``manifest``)."""
        entries = {}
        for name in sorted(files):
            if known and name in known:
                entries[name] = {"size": int(known[name]["size"]), "sha256": known[name]["sha256"]}
                continue
            data = self.read_bytes(f"{rel_dir}/{name}")
            entries[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"files": entries, "committed_at": time.time(), **(meta or {})}
        if self.fence is not None and getattr(self.fence, "writer", None):
            manifest["writer"] = self.fence.writer  # which lease holder committed this
        data = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
        if "writer" in manifest:
            self.write_bytes(f"{rel_dir}/{_copy_name(manifest['writer']['lease'])}", data)
        with self.open_write(f"{rel_dir}/{MANIFEST}", commit=True) as f:  # the lease checked right before
            f.write(data)
        return manifest

    def readable(self, rel_dir: str) -> bool:
        """Whether ``rel_dir`` has a manifest readers take (not a late write of a lost holder)."""
        try:
            self.manifest(rel_dir)
            return True
        except (ChecksumError, NotCommittedError, ValueError):  # ValueError: a name that escapes
            return False

    def is_committed(self, rel_dir: str) -> bool:
        return self.exists(f"{rel_dir}/{MANIFEST}")

    def manifest(self, rel_dir: str) -> dict:
        """The commit of ``rel_dir``: its MANIFEST.json, or, where a later lease generation also
        committed it (its ``.MANIFEST.<generation>.json``), that one; refused if it is a late write."""
        if not self.is_committed(rel_dir):
            raise NotCommittedError(
                f"{self.url}/{rel_dir} has no {MANIFEST}: it was never committed (or its writer crashed)"
            )
        name, manifest = MANIFEST, self._parse(rel_dir, MANIFEST)
        writer = manifest.get("writer")
        if isinstance(writer, dict) and isinstance(writer.get("lease"), int):
            copies = sorted(g for n in self.list(rel_dir) if (g := _copy_generation(n)) is not None)
            if copies and copies[-1] > writer["lease"]:  # MANIFEST.json was overwritten by an earlier holder
                name = _copy_name(copies[-1])
                manifest = self._parse(rel_dir, name)
        self._refuse_late(rel_dir, manifest, name)
        return manifest

    def _parse(self, rel_dir: str, name: str) -> dict:
        where = f"{self.url}/{rel_dir}/{name}"
        try:
            manifest = self.read_json(f"{rel_dir}/{name}")
        except ValueError as e:  # json's decode errors: a truncated or overwritten manifest
            raise ChecksumError(f"{where} is not a valid manifest ({e})") from e
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ChecksumError(f"{where} is not a valid manifest (no file list)")
        for file in manifest["files"]:
            safe_relpath(file, where)
        return manifest

    def _refuse_late(self, rel_dir: str, manifest: dict, name: str = MANIFEST) -> None:
        """A manifest published after its writer's lease was taken over is not a commit: the writer
        was paused or cut off between its last lease check and the publish. Both times are the
        store's own (the manifest's and the next lease generation's object times), so no clocks of
        the writers are compared."""
        writer = manifest.get("writer")
        if not isinstance(writer, dict) or not isinstance(writer.get("folder"), str):
            return  # written without a lease (or by ddm before 0.3)
        where = f"{self.url}/{rel_dir}/{name}"
        folder, generation = safe_relpath(writer["folder"], where), writer.get("lease")
        if not isinstance(generation, int):
            raise ChecksumError(f"{where}: its writer's lease generation {generation!r} is not a number")
        leases = f"{self.top}/{LEASES_DIR}/{folder}"
        self.fs.invalidate_cache(leases)
        try:
            names = self._call(f"list {LEASES_DIR}/{folder}", lambda: self.fs.ls(leases, detail=False, refresh=True))
        except FileNotFoundError:
            return
        later = sorted(g for n in names if (g := _generation(n)) is not None and g > generation)
        if not later:
            return
        taken = _mtime(self._call("stat a lease", lambda: self.fs.info(f"{leases}/{later[0]:08d}.json")))
        published = _mtime(self._call(f"stat {rel_dir}/{name}", lambda: self.fs.info(self.path(f"{rel_dir}/{name}"))))
        if taken is not None and published is not None and published > taken:
            raise NotCommittedError(
                f"{where} was published by lease generation {generation} after generation {later[0]} took over "
                f"{folder}: a late write of a writer that had lost its lease, not a commit"
            )

    def _checked(
        self, rel_dir: str, name: str, manifest: dict, fetch: Callable[[str], T], entry: Callable[[T], dict]
    ) -> T:
        """``fetch`` one committed file, its ``entry`` checked against the manifest; a listed file
        that is missing counts as corruption too."""
        expected = manifest["files"].get(name)
        where = f"{self.url}/{rel_dir}/{name}"
        if expected is None:
            raise ChecksumError(f"{where} is not listed in its manifest")
        try:
            out = fetch(f"{rel_dir}/{name}")
        except FileNotFoundError as e:
            raise ChecksumError(f"{where} is listed in the manifest but missing") from e
        got = entry(out)
        if got["size"] != expected["size"] or got["sha256"] != expected["sha256"]:
            raise ChecksumError(
                f"{where} is corrupted: sha256 {got['sha256'][:12]}… size {got['size']}, "
                f"manifest says {expected['sha256'][:12]}… size {expected['size']}"
            )
        return out

    def read_checked(self, rel_dir: str, name: str, manifest: dict) -> bytes:
        """One file's bytes, checked against its manifest entry (size and sha256)."""
        return self._checked(
            rel_dir,
            name,
            manifest,
            self.read_bytes,
            lambda b: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()},
        )

    def verify(self, rel_dir: str, names: list[str] | None = None) -> dict:
        """Check sizes and sha256 of committed files (streamed); returns the manifest or raises
        ChecksumError."""
        manifest = self.manifest(rel_dir)
        for name in names if names is not None else manifest["files"]:
            self._checked(rel_dir, name, manifest, self.digest, lambda e: e)
        return manifest

    def get_verified(self, rel_dir: str, name: str, local: str, manifest: dict) -> None:
        """Copy one committed file to ``local``, streamed and checked against ``manifest`` (a
        mismatch leaves no local file)."""
        try:
            self._checked(rel_dir, name, manifest, lambda rel: self.get_file(rel, local), lambda e: e)
        except ChecksumError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)
            raise

    def read_verified(self, rel_dir: str, name: str) -> bytes:
        """One committed file's bytes, checked against its manifest."""
        return self.read_checked(rel_dir, name, self.manifest(rel_dir))
