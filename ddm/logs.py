"""Logging set-up, in one place for every entry point (the CLI, Ray workers, ``python -m ddm.train``)."""

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Libraries whose INFO lines say nothing a ddm user acts on (credential discovery, HTTP retries).
QUIET = ("aiobotocore", "botocore", "s3fs", "urllib3", "filelock")


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr at ``level`` with timestamps; chatty libraries at WARNING."""
    logging.basicConfig(level=level, format=FORMAT, datefmt="%H:%M:%S")
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
