"""Which failures a retry can fix: network errors, server faults and throttling, decided by the
exception's type and, for S3, its status and error code. ``Store`` retries those (with backoff)
and nothing else: a missing object, a refusal or bad input fails at once.

What the environment refused (no or incomplete AWS credentials, HTTP 403, a full disk, a read-only
or forbidden path) is said in one line by ``refusal`` (the CLI prints it, exit 2). Whether a failed
training job's restart can help (Ray Train's restarts) is ``retryable_job_error``.
"""

from __future__ import annotations

import contextlib
import errno

from ddm.store.errors import ChecksumError, LeaseHeld, LeaseLost, NotCommittedError

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


# --- errors that neither a retry nor a code change fixes: the environment's ------------------------------

_DENIED_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AccountProblem",
}
_FULL = {errno.ENOSPC, errno.EDQUOT}


def _chain(exc: BaseException):
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an S3 error (botocore's, or s3fs's OSError with it as cause); 409 for
    S3's ConditionalRequestConflict, which s3fs may report by its code alone."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            if response.get("Error", {}).get("Code") == "ConditionalRequestConflict":
                return 409
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if "ConditionalRequestConflict" in str(e):
            return 409
    return None


def _botocore(name: str) -> type[BaseException] | None:
    try:
        import botocore.exceptions as be
    except ImportError:
        return None
    return getattr(be, name, None)


def refusal(exc: BaseException, where: str = "") -> str | None:
    """One line that says what the environment refused and how to fix it, for the errors that no retry
    and no change to ddm fixes: no or incomplete AWS credentials, access denied (HTTP 403), a full disk or
    quota, a read-only file system, a local permission; None for anything else (a bug keeps its traceback).
    ``where`` names the object, folder or store that was being read or written when ``exc``'s own
    file name is not known. Nothing secret is written: credential errors name variables, never values."""
    at = f" ({where})" if where else ""
    no_creds, partial = _botocore("NoCredentialsError"), _botocore("PartialCredentialsError")
    for e in _chain(exc):
        if partial is not None and isinstance(e, partial):
            missing = getattr(e, "kwargs", {}).get("cred_var", "")
            return (
                f"incomplete AWS credentials{at}: {missing or 'a variable'} is missing from the environment; set "
                "both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)"
            )
        if no_creds is not None and isinstance(e, no_creds):
            return (
                f"no AWS credentials found{at}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in "
                "the environment of every process that reads the store (an S3-compatible endpoint: AWS_ENDPOINT_URL)"
            )
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status == 403 or code in _DENIED_CODES or code == "403":
                op = getattr(e, "operation_name", "") or "the request"
                return (
                    f"access denied (HTTP 403 {code or 'Forbidden'} on {op}){at}: the credentials in the environment "
                    "may not do this there; check their permissions (IAM and bucket policy) and that they are the "
                    "ones meant for this bucket"
                )
    for e in _chain(exc):
        if not isinstance(e, OSError):
            continue
        path = f" ({e.filename})" if getattr(e, "filename", None) else at
        if e.errno in _FULL:
            return (
                f"no space left on device{path}: free space there (or point the store or cache at another disk) and "
                "run the same command again; what was committed is kept"
            )
        if e.errno == errno.EROFS:
            return f"read-only file system{path}: give a writable location"
        if isinstance(e, PermissionError):
            return f"permission denied{path}: check that this user may read and write there"
    return None


# --- errors that can never succeed on a retry of a whole job (Ray Train's restarts) -----------------------


def retryable_job_error(exc: BaseException) -> bool:
    """Whether restarting a failed training job's workers can help: not for bad input or a refused
    environment (a ``ValueError``: a config, a name or a file that is wrong; a checksum mismatch; a lost
    lease; a manifest that is missing; credentials or permissions; anything marked ``ddm_retryable =
    False``), which fail the same way every time. A crash, a dead worker, a network error or an
    exhausted store retry may pass on a restart."""
    for e in _chain(exc):
        if getattr(e, "ddm_retryable", None) is False:
            return False
        if isinstance(e, (ValueError, ChecksumError, NotCommittedError, LeaseLost, LeaseHeld)):
            return False
    return refusal(exc) is None
