"""Rank 0's uploads of a job's live views (``progress.json``, the TensorBoard event file) in one
background thread, so that no rank waits for the store in a step: the other ranks would otherwise
wait in their next collective while rank 0 writes.

Each upload is a whole file, so a newer one supersedes an older one still pending: at most one
upload per view waits (the queue is bounded by the number of views). ``flush`` waits for all of
them (at checkpoints and at the end of the job). An upload that fails only warns (the next window
uploads again), except a lost lease, which is raised in the training thread at its next call.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ddm.store.lease import LeaseLost

log = logging.getLogger("ddm.train")


class Uploads:
    def __init__(self) -> None:
        self._pending: dict[str, Callable[[], None]] = {}
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ddm-uploads", daemon=True)
        self._thread.start()

    def submit(self, view: str, upload: Callable[[], None]) -> None:
        """Upload ``view`` in the background with ``upload`` (replacing one of it still pending)."""
        with self._cv:
            self._raise()
            self._pending[view] = upload
            self._cv.notify_all()

    def flush(self) -> None:
        """Wait until every submitted upload is done."""
        with self._cv:
            self._cv.wait_for(lambda: not self._pending and not self._busy)
            self._raise()

    def close(self) -> None:
        self.flush()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def cancel(self) -> None:
        """Drop what is pending and stop (the job failed): nothing more is written."""
        with self._cv:
            self._pending.clear()
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                view = next(iter(self._pending))
                upload = self._pending.pop(view)
                self._busy = True
            try:
                upload()
            except Exception as e:  # noqa: BLE001 - a view; training goes on, the next window uploads again
                if isinstance(e, LeaseLost):
                    with self._cv:
                        self._error = e
                else:
                    log.warning("could not upload %s (%s: %s); retried next window", view, type(e).__name__, e)
            except BaseException as e:  # noqa: BLE001 - e.g. SystemExit in the thread: raised in training
                with self._cv:
                    self._error = e
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
