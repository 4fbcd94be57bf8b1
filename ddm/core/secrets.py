"""Secrets: what ddm never forwards to a cluster, never logs and never stores.

Whatever ddm hands a Ray cluster (forwarded variables, ``runtime_env``, job configs, submission
metadata, the entrypoint) Ray keeps and shows to anyone who can reach that cluster's job server
(``ray job list``); whatever ddm writes to the store every island reads. Three rules follow:

- ``check_forwarded``: one check over everything forwarded to a cluster. It refuses a variable whose
  name looks like a secret (``looks_secret``), a URL that carries credentials, the value of a secret
  of this shell, a private key, a token of a well-known shape; the error names the field, never the value.
- ``redact_url`` / ``redact_urls``: a URL as ddm logs or stores it. Its userinfo (``user:password@``),
  query and fragment each become ``<redacted>``: signed URLs carry their signature and credential in
  the query (``X-Amz-Signature``, ``X-Amz-Credential``, Azure's ``sig``, ``token=``), and telling
  the harmless query parameters from the others is a list that is never complete. Credentials in a
  URL's path (a webhook's) cannot be told from a path and stay.
- ``check_token_transport``: a bearer token or a password goes to another machine over TLS only,
  unless the user names the host in ``DDM_ALLOW_PLAINTEXT_TOKEN`` (comma-separated host names).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# Parts of a variable's name that say it may hold a secret, matched anywhere in the upper-cased name
# on purpose: a false alarm costs a rename, a miss a leaked credential.
SECRET_NAME_RE = re.compile(
    r"SECRET|TOKEN|PASSW(OR)?D|PASSPHRASE|_PWD($|_)|CREDENTIAL|PRIVATE|COOKIE|SIGNATURE|WEBHOOK"
    r"|AUTH(?!ORS?(_|$))"  # NPM_AUTH, BASIC_AUTH, AUTHORIZATION; not GIT_AUTHOR_NAME
    r"|KEY(?!_ID$)"  # API_KEY, SSH_KEY, AZURE_STORAGE_KEY; not a key's public id (but see AWS_ below)
    r"|(^|_)(PAT|SAS|DSN|SIG)($|_)"  # GH_PAT, AZURE_STORAGE_SAS, SENTRY_DSN (holds a key)
    r"|CONN(ECTION)?_?STR"  # AZURE_STORAGE_CONNECTION_STRING: account key inside
    r"|(DATABASE|DB|REDIS|MONGO\w*|POSTGRES\w*|PG|MYSQL|MARIADB|AMQP|RABBITMQ|BROKER)_UR[LI]"  # user:password@ inside
    r"|(?<!NO_)PROXY"  # HTTPS_PROXY, ALL_PROXY: http://user:password@proxy
)
# Every AWS_ variable is taken for a credential (an access key id is half of one and names the
# account) except these settings, which hold none.
AWS_SETTINGS_RE = re.compile(
    r"AWS_(DEFAULT_)?REGION|AWS_ENDPOINT_URL(_\w+)?|AWS_CA_BUNDLE|AWS_RETRY_MODE|AWS_MAX_ATTEMPTS"
    r"|AWS_USE_(FIPS|DUALSTACK)_ENDPOINT|AWS_(REQUEST_CHECKSUM_CALCULATION|RESPONSE_CHECKSUM_VALIDATION)"
    r"|AWS_S3_US_EAST_1_REGIONAL_ENDPOINT|AWS_STS_REGIONAL_ENDPOINTS"
    r"|AWS_(DEFAULT_)?PROFILE|AWS_DEFAULT_OUTPUT|AWS_ROLE_ARN|AWS_ROLE_SESSION_NAME|AWS_SDK_LOAD_CONFIG|AWS_PAGER"
)
PLAINTEXT_OPT_IN = "DDM_ALLOW_PLAINTEXT_TOKEN"  # host names, not a secret
# Names that match the list but hold no secret: a mode (RAY_AUTH_MODE=token), where a secret is
# (RAY_AUTH_TOKEN_PATH, SSH_AUTH_SOCK), the hosts of the opt-in above.
NOT_SECRET_RE = re.compile(rf"{PLAINTEXT_OPT_IN}|\w*_(MODE|FILE|PATH|DIR|SOCK)|TOKENIZERS_\w+|NCCL_\w+")

# Values that are credentials whatever they are called: private keys and tokens whose format
# announces them (GitHub, Hugging Face, Slack, AWS access key ids, GitLab, npm, OpenAI-style keys).
TOKEN_SHAPES = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|\b(gh[pousr]_[A-Za-z0-9]{36}|github_pat_\w{22,}|hf_[A-Za-z0-9]{30,}|xox[abposr]-[\w-]{10,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|glpat-[\w-]{20}|npm_[A-Za-z0-9]{36}|sk-[A-Za-z0-9_-]{20,})\b"
)
# A URL in running text; punctuation that ends a sentence or closes a bracket is not part of it.
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]}]")
ENV_ASSIGNMENT_RE = re.compile(r"(?:^|\s)([A-Z_][A-Z0-9_]*)=")  # NAME=value in a command line or docker option
REDACTED = "<redacted>"
MIN_SECRET_LENGTH = 16  # shorter values of secret-named variables are names, flags and modes, not secrets

FIX = (
    "Ray keeps what a job is submitted with and shows it to anyone who can reach the cluster's job server, "
    "and job configs are stored with every checkpoint: give each island credentials of its own (an instance "
    "profile, an IRSA role or a mounted secret; cluster/README.md) and forward only what is not secret"
)


class SecretForwarded(ValueError):
    """Something forwarded to a cluster (or stored) would carry a secret."""


def looks_secret(name: str) -> bool:
    """A variable name that may hold a secret (``*TOKEN*``, ``*KEY*`` but not ``*_KEY_ID``, ``*_PAT``,
    ``*PROXY``, ``DATABASE_URL``, every ``AWS_*`` but its region and endpoint settings, ...)."""
    upper = name.upper()
    if NOT_SECRET_RE.fullmatch(upper):
        return False
    if upper.startswith("AWS_"):
        return not AWS_SETTINGS_RE.fullmatch(upper)
    return bool(SECRET_NAME_RE.search(upper))


# --- URLs -----------------------------------------------------------------------------------------


# Query parameters of signed URLs (S3, GCS, Azure SAS, CloudFront): the signature and what changes
# with each signing. Dropped by ``redact_url``; every other parameter (``?split=test``) is kept.
SIGNING_PARAMS = {
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "skoid", "sktid", "skt", "ske", "sks", "skv",
    "expires", "signature", "key-pair-id", "policy", "code",
}  # fmt: skip


def _signing(name: str) -> bool:
    lower = name.lower()
    return lower in SIGNING_PARAMS or lower.startswith(("x-amz-", "x-goog-")) or looks_secret(name.replace("-", "_"))


def redact_url(url: str) -> str:
    """``url`` as ddm may log or store it: userinfo and fragment replaced by ``<redacted>``, and of
    the query only the parameters that sign it or carry a secret (``X-Amz-Signature``, ``sig``,
    ``token``, ...), so a URL signed again is the same URL. Anything without ``://`` (a local path,
    ``digits``) is returned as it is."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    rest, hash_, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    kept = [p for p in query.split("&") if p and not _signing(p.split("=", 1)[0])] if query else []
    if query and len(kept) < len([p for p in query.split("&") if p]):
        kept.append(REDACTED)
    return (
        f"{scheme}://{netloc}{slash}{path}"
        + (f"?{'&'.join(kept)}" if kept else question if not query else "")
        + (f"#{REDACTED}" if hash_ and fragment else hash_)
    )


def redact_urls(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it redacted (``redact_url``)."""
    return URL_RE.sub(lambda m: redact_url(m.group(0)), text)


def url_credentials(url: str) -> str | None:
    """What in ``url`` is a credential ("a password", "a token as user name", "a signed query"), or
    None. A short user name alone (``git@github.com``) is not one; a long one is taken for a token
    (``https://<token>@github.com``). A query parameter is a credential where its name looks like a
    secret (``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``, ``token``, ``api_key``) or is an
    OAuth ``code``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unparsable host (a stray bracket): judge the text before the path
        return "userinfo" if "@" in url.split("://", 1)[-1].split("/", 1)[0] else None
    if parts.password:
        return "a password"
    if parts.username and len(parts.username) >= 16:
        return "a token as user name"
    names = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    if any(looks_secret(k.replace("-", "_")) or k.lower() == "code" for k in names):
        return "a signed query"
    return None


# --- one check over everything forwarded -----------------------------------------------------------


def check_forwarded(tree: Any, where: str) -> None:
    """Refuse (``SecretForwarded``, one line naming ``where`` and the field) anything in ``tree`` (a
    JSON-like tree: what a submission carries) that would hand a cluster a secret: a variable of
    an ``env_vars``/``env`` mapping, or set as ``NAME=value`` in a string, whose name looks like a
    secret; a URL with credentials; the value of a secret-named variable of this shell; a private
    key or a token of a well-known shape."""
    problem = find_secret(tree)
    if problem:
        raise SecretForwarded(f"{where}: {problem}. {FIX}")


def find_secret(tree: Any, path: str = "") -> str | None:
    """What ``check_forwarded`` refuses in ``tree``, described with its field, or None."""
    shell = _shell_secrets()
    for field, key, value in _walk(tree, path):
        if key is not None and looks_secret(key):
            return f"{field} forwards {key}, which looks like a secret"
        if not isinstance(value, str):
            continue
        for name in ENV_ASSIGNMENT_RE.findall(value):
            if looks_secret(name):
                return f"{field} sets {name}, which looks like a secret"
        for url in URL_RE.findall(value):
            what = url_credentials(url)
            if what:
                return f"{field} holds a URL with credentials ({what}: {redact_url(url)})"
        for name, secret in shell.items():
            if secret in value:
                return f"{field} holds the value of ${name}"
        if TOKEN_SHAPES.search(value):
            return f"{field} holds what looks like a private key or an access token"
    return None


def _walk(tree: Any, path: str, env: bool = False):
    """(field, variable name or None, value) for every leaf of ``tree``; keys of a mapping named
    ``env_vars`` or ``env`` (Ray's and Kubernetes' variables) are variable names."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            field = f"{path}.{k}" if path else str(k)
            if env and not isinstance(v, (dict, list, tuple)):
                yield field, str(k), v
            else:
                yield from _walk(v, field, env=str(k) in ("env_vars", "env") and isinstance(v, dict))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, None, tree


def _shell_secrets() -> dict[str, str]:
    """The values of this shell's secret-named variables that could be a secret: long enough, and
    not a path that exists (``GOOGLE_APPLICATION_CREDENTIALS=/path/key.json`` names a file)."""
    return {
        name: value
        for name, value in os.environ.items()
        if looks_secret(name) and len(value) >= MIN_SECRET_LENGTH and not os.path.exists(value)
    }


# --- tokens on the wire ----------------------------------------------------------------------------


def check_token_transport(address: str, what: str) -> None:
    """Refuse (``ValueError``, one line) to send a bearer token or a password to ``address`` in the
    clear: an ``http://`` URL, a ``ray://`` Ray Client address or a bare ``host:port`` GCS address
    (Ray's gRPC, unless ``RAY_USE_TLS`` is on) whose host is not loopback, unless the user named
    the host in ``DDM_ALLOW_PLAINTEXT_TOKEN``. ``what``: who would send it ("island 'west'")."""
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme == "https" or (scheme in ("", "ray") and _ray_tls()):
        return
    host = _host(address)
    if not host or _loopback(host) or host.lower() in plaintext_hosts():
        return
    wire = {"http": "plain http", "ray": "Ray Client's gRPC without TLS"}.get(scheme, "Ray's gRPC without TLS")
    raise ValueError(
        f"{what}: refusing to send a token or password to {redact_url(address)} over {wire} "
        "(anyone on the network path can read it): use https:// (a TLS proxy in front of the job server) or "
        f"a port-forward to 127.0.0.1 (ssh -L, kubectl port-forward), or accept the risk for this host with "
        f"{PLAINTEXT_OPT_IN}={host}"
    )


def plaintext_hosts() -> set[str]:
    """The hosts the user allows tokens to in the clear (``DDM_ALLOW_PLAINTEXT_TOKEN``)."""
    return {h.strip().lower() for h in os.environ.get(PLAINTEXT_OPT_IN, "").split(",") if h.strip()}


def ray_token_auth() -> bool:
    """Whether Ray's own clients send this shell's token (``RAY_AUTH_MODE=token``)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _ray_tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def _host(address: str) -> str:
    if "://" not in address:
        address = f"tcp://{address}"
    try:
        return urlsplit(address).hostname or ""
    except ValueError:
        return ""


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to be this machine without asking DNS
        return False
