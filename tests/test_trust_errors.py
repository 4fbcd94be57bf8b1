"""Bad input from the store or the environment is one clear line (exit 2) naming the file, field or URL and
the fix; a killed write's temporary files never block a re-run (issue 34, items 6 and 8)."""

import io
import os
import tarfile
import time
import uuid

import numpy as np
import pytest

from ddm import __version__
from ddm.cli import main
from ddm.data.ingest import IngestConfig, ingest
from ddm.data.pipeline import ShardCommits
from ddm.data.shards import Dataset
from ddm.store import ChecksumError, Store, StoreError
from ddm.store.layout import DATA_DIR, PARTITIONS_DIR
from ddm.store.urls import check_store_url
from tests.test_data import _tar

from .conftest import BUCKET, SECRET


def _error_line(capsys, command: str) -> str:
    """stderr of a command that failed: exactly one line, no traceback; returns it."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"ddm {command}: error: "), err
    return err


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _old(path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


# --- item 6: a killed write's temporary files -------------------------------------------------------------


def test_killed_writes_temporary_files_do_not_block_the_rerun_and_are_cleaned(tmp_path, monkeypatch, capsys):
    """An ingest killed mid-write left ``.tmp-*`` files in its progress and shards folders: the re-run
    resumes (no JSONDecodeError), commits the whole dataset, and removes the stale temporaries."""
    from ddm.data import ingest as ingest_module

    url = str(tmp_path / "run")
    real = ingest_module.WriteShard.__call__

    def dies_at_shard_2(self, part):
        if part["index"] >= 2:
            raise RuntimeError("killed")
        return real(self, part)

    monkeypatch.setattr(ingest_module.WriteShard, "__call__", dies_at_shard_2)
    with pytest.raises(RuntimeError, match="killed"):
        ingest(IngestConfig(source="synthetic:64", shard_size=16, resolution=8), Store(url))
    monkeypatch.setattr(ingest_module.WriteShard, "__call__", real)
    progress, shards = tmp_path / "run" / DATA_DIR / "progress", tmp_path / "run" / DATA_DIR / "shards"
    assert sorted(p.name for p in progress.iterdir()) == ["00000.json", "00001.json"]
    stale = [progress / f".tmp-{uuid.uuid4().hex}-00002.json", shards / f".tmp-{uuid.uuid4().hex}-part-00002.parquet"]
    stale[0].write_bytes(b'{"rows": 16, "ind')  # what a write killed half-way leaves
    stale[1].write_bytes(b"PAR1\x00\x00")
    for p in stale:
        _old(p)

    assert main(["ingest", "synthetic:64", url, "shard_size=16", "resolution=8"]) == 0
    assert "64 samples" in capsys.readouterr().out
    m = Store(url).verify(DATA_DIR)
    assert m["num_samples"] == 64 and m["resumed_shards"] == 2
    assert not any(p.exists() for p in stale)


def test_shard_commits_never_read_temporary_files_and_keep_a_live_writers(tmp_path):
    store = Store(str(tmp_path / "s"))
    commits = ShardCommits(store, "work")
    plan = {"what": "test", "num_units": 4}
    assert commits.start(plan) == {}
    commits.commit(0, {"part-0.bin": b"zero"}, {"rows": 1})
    progress = tmp_path / "s" / "work" / "progress"
    stale = progress / f".tmp-{uuid.uuid4().hex}-00001.json"
    stale.write_bytes(b'{"ind')
    _old(stale)
    live = progress / f".tmp-{uuid.uuid4().hex}-00002.json"  # another writer is writing it right now
    live.write_bytes(b'{"ro')
    (progress / "00003.json").write_bytes(b'{"index": 3, "fi')  # a record cut short (a non-atomic backend)
    done = commits.start(plan)
    assert sorted(done) == [0]  # the cut record's unit is redone, not trusted and not fatal
    assert not stale.exists() and live.exists()


# --- item 8: the environment: credentials, permissions, disk space ------------------------------------------


@pytest.fixture
def fresh_s3(s3_endpoint):
    """s3fs keeps one filesystem per set of options: without this a test would reuse another test's
    connection (and its credentials)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def _no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup (seconds of time-outs)


def test_no_credentials_is_one_line_saying_where_to_set_them(fresh_s3, monkeypatch, tmp_path, capsys):
    _no_aws_credentials(monkeypatch, tmp_path)
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    assert main(["sample", url]) == 2
    err = _error_line(capsys, "sample")
    assert "no AWS credentials" in err and url in err and "AWS_ACCESS_KEY_ID" in err and "environment" in err

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDDMTESTPARTIAL")  # half of a pair
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["sample", url]) == 2
    err = _error_line(capsys, "sample")
    assert "AWS_SECRET_ACCESS_KEY" in err and url in err and "AKIDDMTESTPARTIAL" not in err


def test_access_denied_is_one_line_naming_the_url(fresh_s3, monkeypatch, capsys):
    """A real 403 AccessDenied (moto with IAM checks on, for a user without any policy)."""
    import boto3
    from moto.core.authorization import enable_iam_authentication

    iam = boto3.client("iam", endpoint_url=fresh_s3)
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    with enable_iam_authentication():
        assert main(["sample", url]) == 2
        err = _error_line(capsys, "sample")
        assert "access denied" in err.lower() and "403" in err and url in err and "permission" in err
        assert key["SecretAccessKey"] not in err and SECRET not in err


def test_disk_full_is_one_line_naming_the_path_and_bugs_still_show_a_traceback(tmp_path, monkeypatch, capsys):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    url = str(tmp_path / "run")
    monkeypatch.setattr(os, "fsync", full)  # the kernel reports a full disk at the flush
    assert main(["ingest", "synthetic:8", url]) == 2
    err = _error_line(capsys, "ingest")
    assert "no space left" in err.lower() and url in err and "free space" in err
    monkeypatch.undo()

    from ddm.store.retries import refusal

    def full_disk(rel, sink):  # the local copy of a stored file fills the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = Store(url)
    store.write_bytes("x.bin", b"x")
    monkeypatch.setattr(store, "_stream", full_disk)
    local = str(tmp_path / "cache" / "x.bin")
    with pytest.raises(StoreError) as caught:  # the store's own error, naming the file: one line at the CLI
        store.get_file("x.bin", local)
    assert f"no space left on device ({local})" in str(caught.value) and not os.path.exists(local)
    assert refusal(caught.value.__cause__) == str(caught.value)

    from ddm.cli import commands

    def bug(args):
        raise KeyError("a programming error")

    monkeypatch.setitem(commands.COMMANDS, "models", bug)
    with pytest.raises(KeyError):  # not swallowed: a real bug keeps its traceback
        main(["models"])


# --- item 8: bad input files --------------------------------------------------------------------------------


def _parquet(path, labels, images=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = images or [_png(40 * i) for i in range(len(labels))]
    pq.write_table(pa.table({"image": images, "label": pa.array(labels, pa.int64())}), path)


def test_corrupt_parquet_names_the_file(tmp_path, capsys):
    src = tmp_path / "pq"
    src.mkdir()
    _parquet(src / "a.parquet", [0, 1])
    good = (src / "a.parquet").read_bytes()
    (src / "b.parquet").write_bytes(good[: len(good) // 2])  # cut short: no footer
    assert main(["ingest", str(src), str(tmp_path / "run"), "runner=local", "resolution=8"]) == 2
    err = _error_line(capsys, "ingest")
    assert str(src / "b.parquet") in err and "Parquet" in err


def test_negative_parquet_labels_are_refused_naming_file_and_column(tmp_path, capsys):
    src = tmp_path / "pq"
    src.mkdir()
    _parquet(src / "a.parquet", [0, 1])
    _parquet(src / "b.parquet", [2, -1])
    assert main(["ingest", str(src), str(tmp_path / "run"), "runner=local", "resolution=8"]) == 2
    err = _error_line(capsys, "ingest")
    assert str(src / "b.parquet") in err and "'label'" in err and "-1" in err and "negative" in err
    assert not (tmp_path / "run" / DATA_DIR / "MANIFEST.json").exists()


def _samples(n: int) -> dict[str, dict[str, bytes]]:
    return {f"k{i}": {"png": _png(30 * i), "cls": str(i % 2).encode()} for i in range(n)}


def test_truncated_or_corrupt_tar_is_an_error_naming_it(tmp_path, capsys):
    src = tmp_path / "wds"
    src.mkdir()
    _tar(src / "a.tar", _samples(3))
    _tar(src / "b.tar", _samples(6))
    whole = (src / "b.tar").read_bytes()
    with tarfile.open(src / "b.tar") as tf:
        members = tf.getmembers()
    cut_in_data = members[7].offset_data + 10  # inside the 4th sample's image
    cut_at_header = members[8].offset  # exactly between two members: no end-of-archive blocks
    for cut in (cut_in_data, cut_at_header):
        (src / "b.tar").write_bytes(whole[:cut])
        assert main(["ingest", str(src), str(tmp_path / f"run-{cut}"), "runner=local", "resolution=8"]) == 2
        err = _error_line(capsys, "ingest")
        assert str(src / "b.tar") in err and "truncated" in err
    (src / "b.tar").write_bytes(b"\x01not a tar" * 200)  # not the first tar: read while scanning
    assert main(["ingest", str(src), str(tmp_path / "run-x"), "runner=local", "resolution=8"]) == 2
    err = _error_line(capsys, "ingest")
    assert str(src / "b.tar") in err and "tar" in err
    (src / "b.tar").write_bytes(whole)  # whole again: every sample ingested
    assert main(["ingest", str(src), str(tmp_path / "run-ok"), "runner=local", "resolution=8"]) == 0
    assert Store(str(tmp_path / "run-ok")).manifest(DATA_DIR)["num_samples"] == 9


def test_non_integer_or_negative_cls_names_the_member_and_tar(tmp_path, capsys):
    src = tmp_path / "wds"
    src.mkdir()
    samples = _samples(3)
    samples["k1"]["cls"] = b"cat"
    _tar(src / "a.tar", samples)
    assert main(["ingest", str(src / "a.tar"), str(tmp_path / "run"), "runner=local", "resolution=8"]) == 2
    err = _error_line(capsys, "ingest")
    assert "k1.cls" in err and str(src / "a.tar") in err and "'cat'" in err and "integer" in err
    samples["k1"]["cls"] = b"-3"
    _tar(src / "a.tar", samples)
    assert main(["ingest", str(src / "a.tar"), str(tmp_path / "run"), "runner=local", "resolution=8"]) == 2
    err = _error_line(capsys, "ingest")
    assert "k1.cls" in err and str(src / "a.tar") in err and "negative" in err


# --- item 8: store URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["s3:/bucket/run", "s3:bucket/run", "gs:/b/x", "S3:/b", "s3:///bucket/run", "s3://"])
def test_malformed_store_urls_are_refused(bad):
    with pytest.raises(ValueError, match="not a valid store URL"):
        check_store_url(bad)


def test_well_formed_store_urls_pass():
    for good in ("runs/digits", "/abs/run", "./s3:/odd", "s3://b/run", "memory://x/y", "file:///tmp/x", "gs://b"):
        assert check_store_url(good) == good
    assert check_store_url("file:/tmp/x") == "file:///tmp/x"  # RFC 8089's short form, spelled out


def test_one_slash_s3_url_is_refused_by_the_cli_and_makes_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ingest", "synthetic:8", "s3:/bucket/run"]) == 2
    err = _error_line(capsys, "ingest")
    assert "'s3:/bucket/run'" in err and "s3://bucket/run" in err
    assert main(["sample", "s3:/bucket/run"]) == 2
    assert "s3://bucket/run" in _error_line(capsys, "sample")
    assert list(tmp_path.iterdir()) == []  # no local folder named s3:


# --- item 8: a store written by a newer ddm ----------------------------------------------------------------


def test_data_and_partitions_written_by_a_newer_ddm_are_refused(tmp_path, capsys):
    from ddm.data.reader import PartitionReader

    url = str(tmp_path / "run")
    store = Store(url)
    m = ingest(IngestConfig(source="synthetic:16", resolution=8), store)
    assert m["ddm_version"] == __version__  # what each manifest records from now on
    newer = {**store.read_json(f"{DATA_DIR}/MANIFEST.json"), "format_version": 99, "ddm_version": "9.1"}
    store.write_json(f"{DATA_DIR}/MANIFEST.json", newer)
    with pytest.raises(ValueError, match=rf"written by ddm 9\.1; this is ddm {__version__}"):
        Dataset(store)
    assert main(["partition", url, "num_partitions=2"]) == 2
    err = _error_line(capsys, "partition")
    assert f"{url}/{DATA_DIR}/MANIFEST.json" in err and "written by ddm 9.1" in err and "upgrade" in err
    assert main(["ingest", "synthetic:16", url, "resolution=8"]) == 2  # not taken for another config
    assert "written by ddm 9.1" in _error_line(capsys, "ingest")

    older = {k: v for k, v in newer.items() if k != "ddm_version"}  # no version recorded: say the format
    store.write_json(f"{DATA_DIR}/MANIFEST.json", {**older, "format_version": 3})
    with pytest.raises(ValueError, match="format 3.*a newer ddm"):
        Dataset(store)

    store.write_json(f"{DATA_DIR}/MANIFEST.json", m)
    store.commit(PARTITIONS_DIR, [], meta={"kind": "ddm.partitions", "format_version": 5, "ddm_version": "1.4.2"})
    with pytest.raises(ValueError, match=rf"{PARTITIONS_DIR}/MANIFEST.json was written by ddm 1\.4\.2"):
        PartitionReader(store, 0, 1)


# --- item 8: errors a retry cannot fix are not retried by Ray ----------------------------------------------


def test_checksum_and_user_errors_fail_at_once_others_are_retried():
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from ddm.launchers.ray_job import NoRetryPolicy, worker_error

    def failed(*errors):
        return WorkerGroupError("x", {r: UserExceptionWithTraceback(e, "tb") for r, e in enumerate(errors)})

    checksum = ChecksumError("s3://b/run/experts/00/checkpoints/step_0000010/model.safetensors is corrupted")
    policy = NoRetryPolicy(FailureConfig(max_failures=3))
    assert policy.make_decision(failed(checksum, RuntimeError("gloo: connection closed"))) == FailureDecision.RAISE
    assert policy.make_decision(failed(ValueError("lr must be finite"))) == FailureDecision.RAISE
    for _ in range(3):  # a crash, a lost connection: Ray's restarts, up to max_failures
        assert policy.make_decision(failed(RuntimeError("gloo: connection closed"))) == FailureDecision.RETRY
    assert policy.make_decision(failed(ConnectionError("reset"))) == FailureDecision.RAISE  # the 4th

    # The driver raises the worker's own error (the CLI prints it as one line), not Ray's wrapper.
    assert worker_error(failed(RuntimeError("collateral"), checksum)) is checksum
    assert worker_error(failed(RuntimeError("a crash"))) is None


def test_ray_trainer_gets_the_no_retry_policy():
    from ray.train import FailureConfig

    from ddm.launchers.ray_job import NoRetryPolicy, with_no_retry_policy

    class Base:
        def __init__(self):
            self.run_config = type("RC", (), {"failure_config": FailureConfig(max_failures=2)})()

        def _initialize_and_run_controller(self, **kwargs):
            return kwargs

    got = with_no_retry_policy(Base)()._initialize_and_run_controller(failure_policy=object(), other=1)
    assert isinstance(got["failure_policy"], NoRetryPolicy) and got["other"] == 1
    assert got["failure_policy"].failure_config.max_failures == 2
