"""Object storage by URL: every read and write of a run goes through here.

A ``Store`` is rooted at one URL (``file:///data/run``, ``s3://bucket/run``, ``memory://run``, or a
plain local path) and addresses everything below it by relative POSIX paths. It guarantees:

- **Atomic objects.** A write either publishes the whole object or nothing: local files are written
  to a temporary name and renamed; S3 objects are one PUT (or a multipart upload that is completed
  only on success and aborted on error); other filesystems get the bytes in one call. Every retry
  uploads the whole object again.
- **Manifests commit directories.** ``commit(dir, files)`` writes a ``MANIFEST.json`` with each file's
  size and sha256 *after* the files; readers trust a directory only when its manifest exists and
  ``verify`` catches any file whose bytes changed.
- **Fresh listings.** Listings and existence checks bypass fsspec's directory cache, so a reader
  never acts on a stale view of what another process (or island) wrote.
- **Exclusive creates and fenced writes.** ``create_json`` publishes an object only if the name is
  free (S3 conditional PUT, a hard link locally): leases (``ddm.store.lease``) are built on it. A store
  ``with_fence(check)`` calls ``check`` before each write, delete and commit, so a writer that lost its
  lease stops before it writes.
- **Streams at checkpoint scale.** ``put_file``/``get_file`` hash and move files in bounded pieces
  (never a whole file in memory): S3 multipart uploads of ``part_bytes`` parts, a few in flight,
  each with S3's own SHA-256 checksum, so the server rejects bytes that changed on the way.
- **Credentials from the environment.** S3 uses the standard AWS provider chain; an S3-compatible
  endpoint comes from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``). Nothing secret is logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import time
import uuid
from typing import Any, Callable, Iterator, TypeVar

from ddm.core.faults import fault_hook as _fault_hook
from ddm.store.errors import ChecksumError, NotCommittedError, StoreError
from ddm.store.manifests import MANIFEST, Manifests
from ddm.store.retries import http_status
from ddm.store.retries import refusal as _refusal
from ddm.store.retries import transient as _transient
from ddm.store.transfer import Transfers, with_path
from ddm.store.urls import check_store_url

log = logging.getLogger("ddm.store.store")

__all__ = ["MANIFEST", "ChecksumError", "NotCommittedError", "Store", "StoreError", "absolute_url"]

_COMMITS = itertools.count(1)  # the commits this process published (fault tests pick one)
TMP_PREFIX = ".tmp-"  # a local write in progress (or one a killed process left): never data
# Backends whose "create only if absent" is atomic across processes: local files (a hard link), S3
# (a conditional PUT) and memory:// (one process only, so one interpreter decides).
ATOMIC_CREATE = ("file", "local", "s3", "s3a", "memory")
T = TypeVar("T")


def absolute_url(url: str) -> str:
    """A local path made absolute (workers on other processes or nodes have other working dirs);
    URLs with a scheme are returned unchanged."""
    if "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


class Store(Transfers, Manifests):
    """Reads and writes below one root URL (files at checkpoint scale: ``ddm.store.transfer.Transfers``;
    committed directories: ``ddm.store.manifests.Manifests``)."""

    def __init__(self, url: str, retries: int | None = None, backoff_s: float | None = None, **storage_options: Any):
        url = check_store_url(url)  # s3:/bucket (one slash) is an error, not a local folder named s3:
        self.url = url.rstrip("/")
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol in ("s3", "s3a"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                storage_options.setdefault("endpoint_url", endpoint)
            # Bounded, predictable failure: few retries inside s3fs/botocore, then ours with backoff.
            storage_options.setdefault(
                "config_kwargs",
                {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 2, "mode": "standard"}},
            )
        import fsspec  # a tenth of a second to import: only once a store is opened, not at `ddm --help`

        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as e:
            raise ValueError(f"cannot open store {self.url!r}: {e}") from e
        self.protocol = protocol
        if protocol in ("s3", "s3a"):
            self.fs.retries = 2  # s3fs's own retry loop (default 5); ours runs on top
        # How long a transient outage is ridden out: retries with exponential backoff (0.5, 1, 2 s by
        # default); DDM_STORE_RETRIES and DDM_STORE_BACKOFF_S set them for every store of a process.
        self.retries = int(os.environ.get("DDM_STORE_RETRIES", 3)) if retries is None else retries
        self.backoff_s = float(os.environ.get("DDM_STORE_BACKOFF_S", 0.5)) if backoff_s is None else backoff_s
        self.fence: Callable[..., None] | None = None
        self.top = self.root  # the store's root, also in child stores: where the leases live

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- paths ------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if rel.startswith("..") or "/../" in f"/{rel}/":
            raise ValueError(f"store path {rel!r} escapes the store root")
        return f"{self.root}/{rel}" if rel else self.root

    def _copy(self, **changes: Any) -> "Store":
        """This store (same filesystem, settings and fence) with ``changes`` to its attributes."""
        other = Store.__new__(Store)
        other.__dict__.update(self.__dict__, **changes)
        return other

    def child(self, rel: str) -> "Store":
        """A store rooted at a sub-directory, sharing this one's filesystem."""
        return self._copy(url=f"{self.url}/{rel.strip('/')}", root=self.path(rel))

    def with_fence(self, fence: Callable[..., None]) -> "Store":
        """This store, with ``fence(what, always=False)`` called before every write and delete, and
        with ``always=True`` before every commit (``ddm.store.lease.Fence`` raises once the lease is lost)."""
        return self._copy(fence=fence)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with bounded retries and exponential backoff on transient errors. Under a
        lease (a fenced store) a retry is taken only if the lease is still held and the retry can
        start inside the lease's safe window: a writer cut off mid-write gives up instead of
        publishing after another writer may have taken over."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if not _transient(e):
                    why = _refusal(e, f"{what} at {self.url}")  # credentials, 403, a full disk: one line
                    if why is None:
                        raise
                    raise StoreError(why) from e
                if attempt == self.retries:
                    raise StoreError(
                        f"{what} failed after {self.retries + 1} attempts against {self.url}: {type(e).__name__}: {e}. "
                        "Check that the store is reachable (endpoint, network, credentials in the environment)."
                    ) from e
                delay = self.backoff_s * 2**attempt
                if self.fence is not None:
                    self.fence(f"a retry of {what}", always=True)  # raises once the lease is lost
                    left = getattr(self.fence, "safe_until", float("inf")) - time.time()
                    if delay >= left:
                        raise StoreError(
                            f"{what} failed ({type(e).__name__}) and a retry in {delay:.1f}s would outlast this "
                            f"writer's lease ({max(left, 0):.1f}s left): abandoned, nothing published"
                        ) from e
                log.warning("%s failed (%s); retrying in %.1fs", what, type(e).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # --- reads ------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        p = self.path(rel)
        self.fs.invalidate_cache(p)
        return self._call(f"exists {rel}", lambda: self.fs.exists(p))

    def read_bytes(self, rel: str) -> bytes:
        p = self.path(rel)
        return self._call(f"read {rel}", lambda: self.fs.cat_file(p))

    def write_hashed(self, rel: str, data: bytes) -> dict:
        """Write ``data`` atomically and return its manifest entry {size, sha256}."""
        self.write_bytes(rel, data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def open_read(self, rel: str):
        """A file object for reading (for readers that stream, e.g. Parquet)."""
        return self._call(f"open {rel}", lambda: self.fs.open(self.path(rel), "rb"))

    def size(self, rel: str) -> int:
        p = self.path(rel)
        self.fs.invalidate_cache(p)
        return int(self._call(f"stat {rel}", lambda: self.fs.size(p)))

    def list(self, rel: str = "") -> list[str]:
        """Names directly below ``rel`` (files and directories), from a fresh listing."""
        p = self.path(rel)
        self.fs.invalidate_cache(p)

        def ls() -> list[str]:
            try:
                names = (os.path.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False, refresh=True))
            except FileNotFoundError:
                return []
            return sorted(n for n in names if not n.startswith(TMP_PREFIX))  # a write in progress is not data

        return self._call(f"list {rel}", ls)

    # --- writes -----------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` atomically (all or nothing)."""
        with self.open_write(rel) as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        """Publish ``obj`` as JSON; NaN and infinities are refused (they are not JSON: jq and other
        readers reject the file), so a caller turns them into something a reader can parse."""
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode())

    @contextlib.contextmanager
    def open_write(self, rel: str, commit: bool = False) -> Iterator[io.IOBase]:
        """A writable file that is published only if the ``with`` block completes. ``commit``: the
        write commits a directory, and the lease is checked once more right before the publish."""
        if self.fence is not None:
            self.fence(f"{self.url}/{rel}")
        p = self.path(rel)
        parent = p.rsplit("/", 1)[0]
        if self.protocol == "file":
            os.makedirs(parent, exist_ok=True)
            tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(p)}"
            try:
                try:
                    with open(tmp, "wb") as f:
                        yield f
                        f.flush()
                        os.fsync(f.fileno())
                except OSError as e:
                    raise with_path(e, p) from None  # a full disk names the file
                self._before_publish(rel, commit)
                os.utime(tmp)  # the object's time is its publication's: readers date late commits by it
                os.replace(tmp, p)  # atomic on POSIX
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # One call publishes the bytes (S3: one PUT, or a multipart upload completed only on
            # success and aborted on error), so a retry uploads them again. (Retrying an s3fs file's
            # close() after a failed upload is a no-op that reports success: the object was lost.)
            buf = io.BytesIO()
            yield buf
            data = buf.getvalue()

            def publish() -> None:
                self._before_publish(rel, commit)
                self.fs.pipe_file(p, data)

            self._call(f"write {rel}", publish)
        self.fs.invalidate_cache(parent)

    def _before_publish(self, rel: str, commit: bool) -> None:
        if commit and self.fence is not None:
            self.fence(f"the commit of {self.url}/{rel}", always=True)
        if commit:  # fault tests pause the n-th commit of a process exactly here (its lease just checked)
            _fault_hook("publish", next(_COMMITS), 0)

    def create_json(self, rel: str, obj: Any) -> bool:
        """Publish ``obj`` at ``rel`` only if nothing is there yet; False if something is (or another
        writer is creating it at this moment: S3's 409 ConditionalRequestConflict). Atomic on local
        files (hard link of a complete temporary file), S3 (``If-None-Match: *``) and memory://
        (one process); refused on other backends, where two processes could both succeed."""
        if self.protocol not in ATOMIC_CREATE:
            raise StoreError(
                f"{self.url}: ddm cannot create objects exclusively on {self.protocol}:// (fsspec gives no atomic "
                "'create if absent' there), so it cannot guarantee one writer per folder. Use a local path or "
                "s3:// (an S3-compatible endpoint via AWS_ENDPOINT_URL) for the store"
            )
        data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
        p = self.path(rel)
        parent = p.rsplit("/", 1)[0]
        try:
            if self.protocol == "file":
                os.makedirs(parent, exist_ok=True)
                tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(p)}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.link(tmp, p)
                finally:
                    os.unlink(tmp)
            else:
                self._call(f"create {rel}", lambda: self.fs.pipe_file(p, data, mode="create"))
        except FileExistsError:
            return False
        except OSError as e:
            if http_status(e) == 409:  # S3: a concurrent conditional PUT of the same key is in flight
                return False
            raise
        finally:
            self.fs.invalidate_cache(parent)
        return True

    def delete(self, rel: str, recursive: bool = False) -> None:
        if self.fence is not None:
            self.fence(f"delete {self.url}/{rel}")
        p = self.path(rel)
        if self.exists(rel):
            self._call(f"delete {rel}", lambda: self.fs.rm(p, recursive=recursive))
        self.fs.invalidate_cache(p.rsplit("/", 1)[0])

    def check_reachable(self) -> None:
        """Fail early, with a clear message, when an S3 store's bucket cannot be reached."""
        if self.protocol in ("s3", "s3a"):
            bucket = self.root.split("/", 1)[0]
            try:  # head_bucket: s3fs's exists() would report missing credentials or a 403 as "no bucket"
                self._call("reach store", lambda: self.fs.call_s3("head_bucket", Bucket=bucket))
            except FileNotFoundError:
                raise StoreError(
                    f"bucket {bucket!r} of store {self.url} does not exist or is not visible with the "
                    "credentials in the environment; create it or fix AWS_* settings"
                ) from None
