"""The store's errors: raised by ``ddm.store.store``, ``ddm.store.transfer`` and ``ddm.store.manifests``
(importable from ``ddm.store.store`` too), and by leases (``ddm.store.lease``)."""


class StoreError(RuntimeError):
    """The store could not be reached or an object could not be read or written."""


class ChecksumError(StoreError):
    """A committed file's bytes no longer match its manifest."""


class NotCommittedError(StoreError):
    """A directory has no manifest: it was never committed (or its writer crashed)."""


class LeaseHeld(RuntimeError):
    """Another live writer holds the lease."""


class LeaseLost(RuntimeError):
    """This writer's lease was taken over or expired: it must not write any more."""
