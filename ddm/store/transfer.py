"""Files at checkpoint scale, streamed and never whole in memory: ``Store.put_file``, ``get_file``
and ``digest``. Every piece is hashed on the way, so a manifest entry {size, sha256} comes from the
bytes moved; S3 uploads of more than one part are multipart uploads of ``part_bytes`` parts, a few
in flight, each with S3's own SHA-256 checksum (the server rejects bytes that changed on the way),
completed only on success and aborted on error. Downloads from S3 are one streamed GET.

``Transfers`` is a mixin of ``ddm.store.Store``, which provides ``fs``, ``path``, ``protocol``,
``url``, ``fence`` and ``_call`` (its retries).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

CHUNK = 4 * 2**20  # bytes per read while hashing or copying a stream


class _Digest:
    """Size and sha256 of bytes seen piece by piece: a manifest entry."""

    def __init__(self):
        self.h, self.size = hashlib.sha256(), 0

    def update(self, chunk: bytes) -> None:
        self.h.update(chunk)
        self.size += len(chunk)

    def entry(self) -> dict:
        return {"size": self.size, "sha256": self.h.hexdigest()}


def file_digest(path: str) -> dict:
    """{size, sha256} of a local file, read in pieces."""
    d = _Digest()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            d.update(chunk)
    return d.entry()


def with_path(e: OSError, path: str) -> OSError:
    """A full disk or quota, which the kernel reports on a write without a file name, with the file that
    was being written (the CLI's one line names it, ``ddm.store.retries.refusal``); other errors unchanged."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), path)
    return e


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class Transfers:
    """Streamed file transfers of a ``Store`` (see the module doc)."""

    # Multipart uploads: parts of this size, this many in flight (memory: their product).
    part_bytes = int(os.environ.get("DDM_STORE_PART_MB", "16")) * 2**20
    parts_in_flight = 4

    def put_file(self, local: str, rel: str) -> dict:
        """Publish the local file ``local`` at ``rel`` atomically, in pieces; return its manifest
        entry {size, sha256}, hashed from the bytes read while uploading."""
        if self.fence is not None:
            self.fence(f"{self.url}/{rel}")
        p = self.path(rel)
        parent = p.rsplit("/", 1)[0]
        try:
            if self.protocol == "file":
                return self._put_local(local, p, parent)
            if self.protocol in ("s3", "s3a"):
                return self._put_s3(local, p, rel)
            entry = file_digest(local)
            self._call(f"upload {rel}", lambda: self.fs.put_file(local, p))
            return entry
        finally:
            self.fs.invalidate_cache(parent)

    @staticmethod
    def _put_local(local: str, p: str, parent: str) -> dict:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{os.path.basename(p)}"
        d = _Digest()
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    d.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, p)
        except OSError as e:
            if with_path(e, p) is e:
                raise
            raise with_path(e, p) from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return d.entry()

    def _put_s3(self, local: str, p: str, rel: str) -> dict:
        """One PUT for a file of at most one part, else a multipart upload; every request carries
        the SHA-256 of its body, which S3 checks (a mismatch is a ``BadDigest`` error, retried)."""
        bucket, key, _ = self.fs.split_path(p)
        size = os.path.getsize(local)
        # S3's bounds: parts of at least 5 MiB (but the last), at most 10 000 parts.
        part_bytes = max(self.part_bytes, 5 * 2**20, -(-size // 10_000))
        if size <= part_bytes:
            with open(local, "rb") as f:
                data = f.read()
            digest = hashlib.sha256(data)
            self._call(
                f"write {rel}",
                lambda: self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=data, ChecksumSHA256=_b64(digest.digest())
                ),
            )
            return {"size": size, "sha256": digest.hexdigest()}
        mpu = self._call(
            f"start upload {rel}",
            lambda: self.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256"),
        )
        upload_id, whole, parts = mpu["UploadId"], hashlib.sha256(), []
        try:
            with open(local, "rb") as f, ThreadPoolExecutor(self.parts_in_flight) as pool:
                in_flight: set = set()
                number = 0
                while True:
                    if len(in_flight) >= self.parts_in_flight:  # bounded memory: wait for one to finish
                        done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        parts += [x.result() for x in done]
                    chunk = f.read(part_bytes)
                    if not chunk:
                        break
                    whole.update(chunk)
                    number += 1
                    in_flight.add(pool.submit(self._put_part, bucket, key, upload_id, number, chunk, rel))
                    del chunk  # held by the part's upload until it is sent, no longer
                parts += [x.result() for x in in_flight]
            parts.sort(key=lambda x: x["PartNumber"])
            self._call(
                f"finish upload {rel}",
                lambda: self.fs.call_s3(
                    "complete_multipart_upload",
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            raise
        return {"size": size, "sha256": whole.hexdigest()}

    def _put_part(self, bucket: str, key: str, upload_id: str, number: int, data: bytes, rel: str) -> dict:
        checksum = _b64(hashlib.sha256(data).digest())
        out = self._call(
            f"upload part {number} of {rel}",
            lambda: self.fs.call_s3(
                "upload_part",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            ),
        )
        return {"PartNumber": number, "ETag": out["ETag"], "ChecksumSHA256": out.get("ChecksumSHA256", checksum)}

    def _stream(self, rel: str, sink: Callable[[bytes], None]) -> dict:
        """Feed the object's bytes to ``sink`` in pieces; return {size, sha256}. S3: one streamed
        GET (not a ranged request per piece)."""
        d = _Digest()

        def take(chunk: bytes) -> None:
            d.update(chunk)
            sink(chunk)

        if self.protocol in ("s3", "s3a"):
            from fsspec.asyn import sync

            bucket, key, _ = self.fs.split_path(self.path(rel))

            async def run() -> None:
                body = (await self.fs._call_s3("get_object", Bucket=bucket, Key=key))["Body"]
                try:
                    while chunk := await body.read(CHUNK):
                        take(chunk)
                finally:
                    body.close()

            sync(self.fs.loop, run)
        else:
            with self.fs.open(self.path(rel), "rb", block_size=self.part_bytes) as src:
                while chunk := src.read(CHUNK):
                    take(chunk)
        return d.entry()

    def get_file(self, rel: str, local: str) -> dict:
        """Copy the object at ``rel`` to the local file ``local`` in pieces, hashing as it goes;
        return {size, sha256}. A retry starts the copy over; a failure leaves no local file."""

        def fetch() -> dict:
            try:
                with open(local, "wb") as dst:
                    return self._stream(rel, dst.write)
            except OSError as e:
                if with_path(e, local) is e:
                    raise
                raise with_path(e, local) from e

        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        try:
            return self._call(f"read {rel}", fetch)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)
            raise

    def digest(self, rel: str) -> dict:
        """{size, sha256} of a stored object, streamed (nothing kept)."""
        return self._call(f"read {rel}", lambda: self._stream(rel, lambda chunk: None))
