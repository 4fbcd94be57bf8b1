"""TensorBoard event files of a job, beside ``metrics.jsonl`` in its folder in the store.

Rank 0 writes one event file per run of the job (``tensorboard/events.out.tfevents.*``) into local
scratch (TensorBoard's record format, tensorboardX's protobufs) and uploads it after every log
window, so ``tensorboard --logdir <store URL>/<job folder>/tensorboard`` (TensorBoard reads s3://,
with ``S3_ENDPOINT`` for an S3-compatible server, and other fsspec URLs) shows step, loss and
steps/s while the job runs. A resumed run starts its file with TensorBoard's session-start
marker just past the resumed step: TensorBoard then drops what an earlier attempt logged after the
commit it resumed from, as ``metrics.jsonl`` does. Without tensorboardX installed (a bare GPU
machine), the job trains without event files and says so once.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time

from ddm.store import Store
from ddm.store.layout import TENSORBOARD

log = logging.getLogger("ddm.train")


def open_board(run: Store, resumed_step: int | None) -> "Board | None":
    """The run's event file, or None (one warning) where tensorboardX cannot be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        log.warning(
            "no TensorBoard event files for this job: tensorboardX cannot be imported (%s); pip install tensorboardX "
            "protobuf to have them. metrics.jsonl and progress.json are written as always",
            e,
        )
        return None
    return Board(run, resumed_step)


class Board:
    """The event file of this run of a job (rank 0 only): each upload holds every window logged so far."""

    def __init__(self, run: Store, resumed_step: int | None):
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.record_writer import RecordWriter

        self.run = run
        self._lock = threading.Lock()
        self._dir = tempfile.mkdtemp(prefix="ddm-tb-")
        self.name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._writer = RecordWriter(os.path.join(self._dir, self.name))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if resumed_step is not None:
            # TensorBoard drops earlier events from this step on: what came after the resumed commit.
            start = SessionLog(status=SessionLog.START)
            self._write(Event(wall_time=time.time(), step=resumed_step + 1, session_log=start))

    def _write(self, event) -> None:
        self._writer.write(event.SerializeToString())

    def log(self, record: dict) -> None:
        """Add a log window's scalars to the local event file (``upload`` sends it to the store)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        wall = float(record.get("time") or time.time())
        with self._lock:
            for key in ("loss", "steps_per_s"):
                if record.get(key) is not None:
                    value = Summary.Value(tag=f"train/{key}", simple_value=float(record[key]))
                    self._write(Event(wall_time=wall, step=int(record["step"]), summary=Summary(value=[value])))
            self._writer.flush()

    def upload(self) -> None:
        """The event file as it is now (every window logged so far) to the store; in the
        background (``ddm.train.uploads``), so it reads a consistent copy."""
        with self._lock:
            with open(os.path.join(self._dir, self.name), "rb") as f:
                data = f.read()
        self.run.write_bytes(f"{TENSORBOARD}/{self.name}", data)

    def close(self) -> None:
        self._writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)
