"""Tier 3: the store on file://, memory:// and a real S3 endpoint (moto server) through s3fs."""

import hashlib

import pytest

from ddm.store.store import MANIFEST, ChecksumError, NotCommittedError, Store, StoreError
from tests.conftest import SECRET


def test_write_read_list(store_url):
    store = Store(store_url)
    store.write_bytes("a/b/one.bin", b"hello")
    store.write_json("a/two.json", {"x": 1})
    assert store.read_bytes("a/b/one.bin") == b"hello"
    assert store.read_json("a/two.json") == {"x": 1}
    assert store.list("a") == ["b", "two.json"]
    assert store.exists("a/b/one.bin") and not store.exists("a/missing")
    assert store.size("a/b/one.bin") == 5
    assert store.list("nothing-here") == []


def test_failed_write_leaves_nothing_behind(store_url):
    store = Store(store_url)
    store.write_bytes("keep.bin", b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.open_write("partial.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("boom")
    assert not store.exists("partial.bin")
    with pytest.raises(RuntimeError):
        with store.open_write("keep.bin") as f:
            f.write(b"new but unfinished")
            raise RuntimeError("boom")
    assert store.read_bytes("keep.bin") == b"old"  # the old object survives a failed overwrite
    assert store.list("") == ["keep.bin"]  # no temporary files visible


def test_listing_sees_writes_from_another_client(store_url):
    """A second Store (another process or island) writes; the first one's listing is not stale."""
    a, b = Store(store_url), Store(store_url)
    assert a.list("d") == []
    b.write_bytes("d/x", b"1")
    assert a.list("d") == ["x"]
    b.write_bytes("d/y", b"2")
    assert a.list("d") == ["x", "y"] and a.exists("d/y")


def test_commit_verify_and_corruption(store_url):
    store = Store(store_url)
    store.write_bytes("ckpt/w.bin", b"weights")
    store.write_bytes("ckpt/opt.bin", b"optimizer")
    assert not store.is_committed("ckpt")
    with pytest.raises(NotCommittedError, match="never committed"):
        store.manifest("ckpt")
    manifest = store.commit("ckpt", ["w.bin", "opt.bin"], meta={"step": 3})
    assert manifest["files"]["w.bin"] == {"size": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert store.verify("ckpt")["step"] == 3
    assert store.read_verified("ckpt", "w.bin") == b"weights"
    store.write_bytes("ckpt/w.bin", b"weightz")  # flip a byte after the commit
    with pytest.raises(ChecksumError, match="w.bin is corrupted"):
        store.verify("ckpt")
    with pytest.raises(ChecksumError, match="corrupted"):
        store.read_verified("ckpt", "w.bin")
    store.delete("ckpt/opt.bin")
    with pytest.raises(ChecksumError, match="opt.bin is listed in the manifest but missing"):
        store.verify("ckpt", ["opt.bin"])
    assert MANIFEST in store.list("ckpt")


def test_paths_cannot_escape_the_root(tmp_path):
    store = Store(str(tmp_path / "root"))
    with pytest.raises(ValueError, match="escapes the store root"):
        store.write_bytes("../outside", b"x")


def test_plain_local_path_is_a_file_store(tmp_path):
    store = Store(str(tmp_path / "plain"))
    store.write_bytes("x.txt", b"1")
    assert (tmp_path / "plain" / "x.txt").read_bytes() == b"1"


def test_unknown_protocol_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot open store 'nosuch://x'"):
        Store("nosuch://x")


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' .* does not exist"):
        Store("s3://no-such-bucket/run").check_reachable()


def test_unreachable_endpoint_fails_after_bounded_retries(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    store = Store(
        "s3://ddm-test/x",
        retries=2,
        backoff_s=0.01,
        config_kwargs={"retries": {"max_attempts": 1}},
        skip_instance_cache=True,
    )
    with pytest.raises(StoreError, match="failed after 3 attempts .* Check that the store is reachable"):
        store.read_bytes("anything")


def test_pyarrow_reads_what_s3fs_wrote(s3_endpoint):
    """A second, independent S3 client (pyarrow's C++ one) sees the same bytes."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    store = Store("s3://ddm-test/interop")
    table = pa.table({"id": [1, 2, 3], "v": [b"a", b"bb", b"ccc"]})
    with store.open_write("t.parquet") as f:
        pq.write_table(table, f)
    host_port = s3_endpoint.removeprefix("http://")
    s3 = pafs.S3FileSystem(
        endpoint_override=host_port, scheme="http", region="us-east-1", access_key="testing", secret_key=SECRET
    )
    assert pq.read_table("ddm-test/interop/t.parquet", filesystem=s3, use_threads=False).equals(table)


@pytest.mark.parametrize("backend", ["memory", "s3"])  # local writes are a rename, not an upload
def test_a_failed_upload_is_uploaded_again_on_retry(backend, request, monkeypatch):
    """A write whose first attempt dies mid-way (a connection reset) publishes the whole object on
    the retry: nothing reports success without the bytes in the store."""
    import uuid

    if backend == "s3":
        request.getfixturevalue("s3_endpoint")
    store_url = (
        f"s3://ddm-test/retry-{uuid.uuid4().hex[:8]}" if backend == "s3" else f"memory://retry/{uuid.uuid4().hex}"
    )
    store = Store(store_url, backoff_s=0.01)
    real, calls = store.fs.pipe_file, []

    def flaky(path, data, **kw):
        calls.append(len(data))
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer")
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", flaky)
    store.write_json("ckpt/.rank000.done", {"a": 1})
    assert calls == [calls[0], calls[0]] and Store(store_url).read_json("ckpt/.rank000.done") == {"a": 1}


def _random_file(path, size, seed=0):
    import numpy as np

    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return data


@pytest.mark.parametrize("size", [0, 1000, 5 * 2**20 + 123])  # empty, one PUT, multipart (1 MiB parts)
def test_put_and_get_file_stream_with_checksums(store_url, tmp_path, size):
    """Files move in pieces; the returned entry is the file's size and sha256, a round trip gives
    the bytes back, and a commit made from the entries verifies."""
    store = Store(store_url)
    store.part_bytes, store.parts_in_flight = 2**20, 2  # several parts, few in flight
    data = _random_file(tmp_path / "src.bin", size)
    entry = store.put_file(str(tmp_path / "src.bin"), "ckpt/big.bin")
    assert entry == {"size": size, "sha256": hashlib.sha256(data).hexdigest()}
    manifest = store.commit("ckpt", ["big.bin"], known={"big.bin": entry})
    assert store.verify("ckpt") == manifest
    store.get_verified("ckpt", "big.bin", str(tmp_path / "back.bin"), manifest)
    assert (tmp_path / "back.bin").read_bytes() == data
    assert store.read_bytes("ckpt/big.bin") == data


def test_get_file_refuses_changed_bytes_and_leaves_nothing(store_url, tmp_path):
    store = Store(store_url)
    _random_file(tmp_path / "src.bin", 4096)
    entry = store.put_file(str(tmp_path / "src.bin"), "ckpt/a.bin")
    manifest = store.commit("ckpt", ["a.bin"], known={"a.bin": entry})
    store.write_bytes("ckpt/a.bin", b"x" * 4096)  # same size, other bytes
    with pytest.raises(ChecksumError, match="a.bin is corrupted"):
        store.get_verified("ckpt", "a.bin", str(tmp_path / "back.bin"), manifest)
    assert not (tmp_path / "back.bin").exists()
    with pytest.raises(ChecksumError, match="a.bin is corrupted"):
        store.verify("ckpt")


def test_s3_multipart_upload_carries_sha256_checksums(s3_endpoint, tmp_path):
    """Each part is sent with the SHA-256 of its bytes, and S3 keeps the object's composite checksum
    (the SHA-256 of the parts' SHA-256s), which a reader can check without downloading."""
    import base64
    import uuid

    store = Store(f"s3://ddm-test/mpu-{uuid.uuid4().hex[:8]}")
    store.part_bytes = 5 * 2**20  # S3's smallest part
    data = _random_file(tmp_path / "src.bin", 11 * 2**20 + 7)
    store.put_file(str(tmp_path / "src.bin"), "big.bin")
    bucket, key, _ = store.fs.split_path(store.path("big.bin"))
    head = store.fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    parts = [data[i : i + store.part_bytes] for i in range(0, len(data), store.part_bytes)]
    composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    assert head["ContentLength"] == len(data)
    assert head["ChecksumSHA256"].split("-")[0] == base64.b64encode(composite).decode()
    # (moto stores the checksum it is sent without checking it against the body; AWS S3 refuses a
    # mismatch with BadDigest, which the store retries by uploading the part again.)


def test_retries_are_decided_by_exception_type():
    import errno

    import aiohttp
    import botocore.exceptions as be

    from ddm.store.store import _transient

    def client_error(code, status):
        return be.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def wrapped(cause, exc=None):  # s3fs re-raises botocore errors as OSError with the cause kept
        exc = exc or OSError(errno.EIO, "wrapped")
        exc.__cause__ = cause
        return exc

    transient = [
        ConnectionResetError(),
        TimeoutError(),
        be.EndpointConnectionError(endpoint_url="http://x"),
        be.ReadTimeoutError(endpoint_url="http://x"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut"),
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        wrapped(client_error("ServiceUnavailable", 503)),
        OSError(errno.ECONNRESET, "reset"),
    ]
    permanent = [
        FileNotFoundError("gone"),
        PermissionError("denied"),
        ValueError("bad"),
        KeyError("x"),
        client_error("AccessDenied", 403),
        client_error("NoSuchBucket", 404),
        wrapped(client_error("InvalidRequest", 400)),
        OSError(errno.ENOSPC, "disk full"),
        RuntimeError("Connection pool is full"),  # a name is not a type
    ]
    assert [_transient(e) for e in transient] == [True] * len(transient)
    assert [_transient(e) for e in permanent] == [False] * len(permanent)
