"""Logging set-up, in one place for every entry point (the CLI, Ray workers, ``python -m ddm.train``)."""

import contextlib
import logging
import os
import sys
import time
from typing import Iterator

from ddm.core.secrets import redact_urls

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries whose INFO lines say nothing a ddm user acts on (credential discovery, HTTP retries).
QUIET = ("aiobotocore", "botocore", "s3fs", "urllib3", "filelock")


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr at ``level`` with timestamps; chatty libraries at WARNING."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_redact)  # a URL with user:password@ or a signed query is never logged whole
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def _redact(record: logging.LogRecord) -> bool:
    """Credentials in URLs (``ddm.core.secrets.redact_urls``) out of a record's message."""
    message = record.getMessage()
    if "://" in message:
        record.msg, record.args = redact_urls(message), None
    return True


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Everything written to stdout in the block, by Python or by native code (DeepSpeed's build
    lines, Ray's worker logs), goes to stderr: a command's stdout then carries only its result."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # when sys.stdout is not fd 1 (e.g. captured)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


class _Lines:
    """A progress counter that logs one plain line every ``every_s`` seconds (for logs and pipes)."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", every_s: float = 30.0, queued=False, **_):
        self.iterable, self.desc, self.unit, self.every_s = iterable, (desc or "").strip(), unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.initial, self.postfix, self._closed = 0, 0, "", False
        self._t0 = self._last = time.monotonic()
        self._say("queued" if queued else "started")

    def _say(self, what: str) -> None:
        size = f" ({self.total} {self.unit})" if self.total is not None else ""
        logging.getLogger("ddm.progress").info("%s: %s%s", self.desc, what, size)

    def reset(self, total=None) -> None:
        """Start (again) from 0, the clock too, as tqdm's ``reset`` does: queued work that starts."""
        self.total = total if total is not None else self.total
        self.n, self.initial, self.postfix = 0, 0, ""
        self._t0 = self._last = time.monotonic()
        self._say("started")

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.every_s:
            self._line()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def _line(self) -> None:
        self._last = time.monotonic()
        of = f"/{self.total}" if self.total is not None else ""
        rate = (self.n - self.initial) / max(self._last - self._t0, 1e-9)  # steps done since it started
        extra = f", {self.postfix}" if self.postfix else ""
        logging.getLogger("ddm.progress").info(
            "%s: %d%s %s (%.1f %s/s%s)", self.desc, self.n, of, self.unit, rate, self.unit, extra
        )

    def close(self) -> None:
        if not self._closed:  # one final line
            self._closed = True
            if self.n or self.postfix:
                self._line()


def progress(iterable=None, queued: bool = False, **kwargs):
    """A progress bar (tqdm) on a terminal; elsewhere plain log lines every 30 s, so that logs and
    pipes get no carriage-return noise. ``disable=True``: the iterable itself. ``queued=True``: the
    work waits for a slot; its clock (the rate it shows) starts at ``bar.reset()``, when it starts."""
    if kwargs.pop("disable", False):
        return iterable
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(iterable, **kwargs)
        if queued:
            bar.set_postfix_str("queued")
        return bar
    return _Lines(iterable, queued=queued, **kwargs)
