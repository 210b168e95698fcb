"""What counts as a secret, and how it is hidden: one set of rules for every place Kitchen shows or logs.

- ``is_secret_name``: names of environment variables, config fields and metadata keys whose values are
  secrets (``TINKER_API_KEY``, ``hf_token``, ``MLFLOW_TRACKING_PASSWORD``, ``KITCHEN_FAILURE_WEBHOOK_URL``),
  matched by whole words so ``eval_max_tokens``, ``tokenizer`` and ``asset_key`` are not.
- ``redact_uri``: a URI for display, credentials removed whatever the scheme (``postgresql://u:p@h/db``).
- ``redact_webhook``: only the scheme and host of a URL whose path is the credential (Slack-style hooks).
- ``secret_values`` / ``redact_text``: the secret values in the environment, scrubbed out of free text.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "[REDACTED]"
_HIDDEN = "***"

#: A word that alone marks a secret name (``HF_TOKEN``, ``db_password``, ``OTEL_EXPORTER_OTLP_HEADERS``).
#: Not ``pwd``: the shell's ``PWD`` is the working directory, and redacting it would mangle every path.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "cookie",
        "headers",
        "webhook",
        "dsn",
        "apikey",
        "accesskey",
        "privatekey",
    }
)
#: Two adjacent words that together mark one (``TINKER_API_KEY``, ``aws_access_key_id``).
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
#: Query parameters that carry credentials in a URL (``?token=``, presigned ``X-Amz-Signature``).
_SECRET_QUERY_WORDS = _SECRET_WORDS | {"key", "sig", "signature", "code"}


def _words(name: str) -> list[str]:
    """``eval_max_tokens`` -> [eval, max, tokens]; ``apiKey`` -> [api, key]; ``X-Amz-Signature`` too."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a variable, field or key called ``name`` holds a secret (whole words, any case)."""
    words = _words(name)
    return any(w in _SECRET_WORDS for w in words) or not _SECRET_PAIRS.isdisjoint(itertools.pairwise(words))


def drop_secret_keys(values: Mapping[str, object]) -> dict[str, object]:
    """``values`` without the entries whose keys name secrets (for config recorded as lineage)."""
    return {k: v for k, v in values.items() if not is_secret_name(k)}


def redact_uri(uri: str) -> str:
    """``uri`` safe to show: no user name or password (any scheme: ``http``, ``postgresql``, ``mysql``),
    and credential-like query parameters (``token``, ``key``, ``sig``, ...) hidden.

    A URI that does not parse as ``scheme://[user[:password]@]host[:port]/...`` (a password with an
    unescaped ``/``, ``?`` or ``#`` puts part of it in the port, path or fragment) is hidden after the
    scheme.
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return _HIDDEN
    if not parts.scheme or not (parts.netloc or parts.query):
        return uri  # a plain path, sqlite:////abs/path, models:/name@alias: nothing to hide
    netloc = parts.netloc
    try:
        port = parts.port
    except ValueError:
        return f"{parts.scheme}://{_HIDDEN}"
    if "@" in parts.path + parts.query + parts.fragment:
        return f"{parts.scheme}://{_HIDDEN}"
    if parts.username is not None or parts.password is not None:
        netloc = f"{_HIDDEN}@{parts.hostname or ''}" + (f":{port}" if port else "")
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_param(k) for k, _ in pairs):
            query = urlencode([(k, _HIDDEN if _is_secret_param(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _is_secret_param(name: str) -> bool:
    return is_secret_name(name) or any(w in _SECRET_QUERY_WORDS for w in _words(name))


def redact_webhook(url: str) -> str:
    """Scheme and host only: a webhook's path and query are its credential (``hooks.slack.com/services/
    T0/B0/XXXX``), so nothing after the host is shown."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return _HIDDEN
    if not parts.scheme or not host:
        return _HIDDEN
    rest = "/***" if (parts.path not in ("", "/") or parts.query or parts.fragment) else ""
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "") + rest


def secret_values(environ: Mapping[str, str] | None = None, *, min_length: int = 6) -> list[str]:
    """Secret values in ``environ`` (default ``os.environ``): those of secret-named variables, and the
    password of any URL-valued variable (``MLFLOW_TRACKING_URI=postgresql://u:PASSWORD@h/db``)."""
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for name, value in env.items():
        if is_secret_name(name):
            found.add(value)
        if "://" in value:
            try:
                password = urlsplit(value).password
            except ValueError:
                continue
            if password:
                found.add(password)
    return sorted((v for v in found if len(v) >= min_length), key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` replaced by ``[REDACTED]`` (longest first, so a secret that
    contains another is hidden whole)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text
