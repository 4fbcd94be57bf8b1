"""The store's errors: raised by ``ddm.store``, ``ddm.transfer`` and ``ddm.manifests``, importable
from ``ddm.store``."""


class StoreError(RuntimeError):
    """The store could not be reached or an object could not be read or written."""


class ChecksumError(StoreError):
    """A committed file's bytes no longer match its manifest."""


class NotCommittedError(StoreError):
    """A directory has no manifest: it was never committed (or its writer crashed)."""
