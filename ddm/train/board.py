"""TensorBoard event files of a job, beside ``metrics.jsonl`` in its folder in the store.

Rank 0 writes one event file per run of the job (``tensorboard/events.out.tfevents.*``) into local
scratch with tensorboardX and uploads it after every log window, so ``tensorboard --logdir
<store URL>/<job folder>/tensorboard`` (TensorBoard reads s3:// and other fsspec URLs) shows step,
loss and steps/s while the job runs. A resumed run starts its file with TensorBoard's session-start
marker just past the resumed step: TensorBoard then drops what an earlier attempt logged after the
commit it resumed from, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from ddm.layout import TENSORBOARD
from ddm.lease import LeaseLost
from ddm.store import Store

log = logging.getLogger("ddm.train")


class Board:
    """The event file of this run of a job (rank 0 only)."""

    def __init__(self, run: Store, resumed_step: int | None):
        from tensorboardX import SummaryWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.run = run
        self._dir = tempfile.mkdtemp(prefix="ddm-tb-")
        self._writer = SummaryWriter(logdir=self._dir, flush_secs=3600)
        if resumed_step is not None:
            # TensorBoard drops earlier events from this step on: what came after the resumed commit.
            start = Event(wall_time=time.time(), step=resumed_step + 1, session_log=SessionLog(status=SessionLog.START))
            self._writer._get_file_writer().add_event(start)

    def log(self, record: dict) -> None:
        """Add a log window's scalars and upload the event file (a failed upload only warns: the
        next window uploads the whole file again)."""
        step = int(record["step"])
        for key in ("loss", "steps_per_s"):
            if record.get(key) is not None:
                self._writer.add_scalar(f"train/{key}", float(record[key]), step, walltime=record.get("time"))
        self._writer.flush()
        for name in os.listdir(self._dir):
            try:
                self.run.put_file(os.path.join(self._dir, name), f"{TENSORBOARD}/{name}")
            except LeaseLost:
                raise
            except Exception as e:  # noqa: BLE001 - the event file is a view; training goes on
                log.warning("could not upload the TensorBoard events (%s: %s); retried next window", type(e).__name__, e)

    def close(self) -> None:
        self._writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)
