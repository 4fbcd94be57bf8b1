"""The object store, the one thing islands share and the trust boundary between them: a ``Store`` per
fsspec URL with atomic objects, commits by manifest and verified reads (``store``, ``manifests``,
``transfer``, ``errors``), retries of what a retry can fix (``retries``), one writer per folder by
leases in the store itself (``lease``), the run folder's names and the checks on every name read
from it (``layout``, ``urls``). No torch.

May import: core.
"""

from ddm.store.errors import ChecksumError, LeaseHeld, LeaseLost, NotCommittedError, StoreError
from ddm.store.store import Store, absolute_url

__all__ = ["ChecksumError", "LeaseHeld", "LeaseLost", "NotCommittedError", "Store", "StoreError", "absolute_url"]
