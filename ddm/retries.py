"""Which failures a retry can fix: network errors, server faults and throttling, decided by the
exception's type and, for S3, its status and error code. ``Store`` retries those (with backoff)
and nothing else: a missing object, a refusal or bad input fails at once.
"""

from __future__ import annotations

import contextlib
import errno

# S3 status codes and error codes that a retry can fix (throttling, server faults, slow requests).
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}
_NETWORK_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EAGAIN,
}


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the network or the server failed this time": Python's own,
    botocore's connection errors, aiohttp's client connection and payload errors, fsspec's timeout."""
    import asyncio  # 15 ms to import: not at the start of every command

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, asyncio.TimeoutError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as be

        types += [be.ConnectionError, be.HTTPClientError, be.IncompleteReadError, be.ResponseStreamingError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    return tuple(types)


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def transient(exc: BaseException) -> bool:
    """Whether a retry can fix ``exc``, decided by type: a network error, a server fault or
    throttling (S3 5xx/429 and their codes, also when s3fs re-raised them as ``OSError``), never a
    missing object, a refusal or bad input. The exception's causes are followed (s3fs keeps the
    botocore error as ``__cause__``)."""
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    if isinstance(exc, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, _TRANSIENT):
            return True
        response = getattr(e, "response", None)  # botocore's ClientError
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code in _RETRY_CODES or status >= 500 or status == 429 or code in ("500", "502", "503", "504")
        if isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False
