"""Store URLs checked before anything is opened: a mistyped scheme fails with one clear line instead of
becoming a local folder.

fsspec takes anything without ``://`` for a local path, so ``s3:/bucket/run`` (one slash) would be a
folder named ``s3:`` below the working directory, and a run would write there without a word.
"""

from __future__ import annotations

import re

# RFC 3986's scheme, also in fsspec's chained form (``simplecache::s3``).
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*"
_CHAINED = re.compile(rf"^{_SCHEME}(::{_SCHEME})*$")
_LOOKS_LIKE_SCHEME = re.compile(rf"^({_SCHEME}):")
# Object stores: the part after :// must start with a bucket (container) name.
_BUCKETED = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


def _refuse(url: str, why: str, fix: str, what: str) -> ValueError:
    return ValueError(f"{url!r} is not a valid {what}: {why}; {fix}")


def check_store_url(url: str, what: str = "store URL") -> str:
    """``url`` if it is a local path or a well-formed URL, else ``ValueError`` saying what to write.

    Refused: a scheme-looking prefix without ``//`` (``s3:/bucket/run``, ``s3:bucket``, ``gs:/b``: write
    ``s3://bucket/run``, or ``./s3:/bucket/run`` for a local folder of that name), a malformed scheme
    before ``://``, and an object store URL without a bucket (``s3://``, ``s3:///bucket``). RFC 8089's
    short form ``file:/abs/path`` is accepted and returned as ``file:///abs/path`` (the form every
    process of a run reads the same way). ``what`` names the URL in the error (a source URL too).
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"{what} is empty; give a path or a URL such as s3://bucket/run")
    if "://" in url:
        scheme, rest = url.split("://", 1)
        if not _CHAINED.match(scheme):
            raise _refuse(url, f"{scheme!r} is not a URL scheme", "write e.g. s3://bucket/run or a local path", what)
        last = scheme.rsplit("::", 1)[-1].lower()
        if last in _BUCKETED and (not rest or rest.startswith("/")):
            raise _refuse(url, "it names no bucket", f"write {last}://<bucket>/<path>", what)
        return url
    m = _LOOKS_LIKE_SCHEME.match(url)
    if m is None:
        return url  # a local path
    scheme, rest = m.group(1), url[m.end() :]
    if scheme.lower() == "file":
        if rest.startswith("/"):
            return f"file://{rest}"
        raise _refuse(url, "file: needs an absolute path", f"write the path itself (./{rest} or /abs/{rest})", what)
    raise _refuse(
        url,
        f"{scheme}: without // is not a URL, and as a path it would be a local folder named {scheme + ':'!r}",
        f"write {scheme.lower()}://{rest.lstrip('/')} (or ./{url} for a local folder of that name)",
        what,
    )
