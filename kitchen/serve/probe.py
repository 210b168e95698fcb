"""Asking a running ``kitchen serve`` which version it serves (its ``/health``), and waiting for a new one.

What the ``deployment`` asset records comes from the server itself, not from what was intended: a server
that is down, serves another model, or has not picked up the new champion is reported as such.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kitchen.secrets import redact_uri


class DeploymentError(RuntimeError):
    """The server cannot be reached, is not a ``kitchen serve``, or does not serve what was expected."""


@dataclass(frozen=True)
class ServedModel:
    url: str
    ref: str
    """What the server was started on (``NAME@champion``, ``NAME/3``, a sampler path)."""
    version: str
    """What that names now (``NAME/3``)."""


def served_model(url: str, *, timeout_s: float = 10.0) -> ServedModel:
    import httpx

    where = redact_uri(url)
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise DeploymentError(f"the server at {where} is unreachable ({type(err).__name__}: {err})") from None
    try:
        body = response.json()
        return ServedModel(url=where, ref=str(body["model"]), version=str(body["version"]))
    except (ValueError, KeyError, TypeError):
        raise DeploymentError(
            f"{where}/health answered HTTP {response.status_code} without a model and version: "
            "is it a kitchen serve?"
        ) from None


def wait_for_version(url: str, version: str, *, wait_s: float, poll_s: float = 0.5) -> ServedModel:
    """The server's answer once it serves ``version``; fails after ``wait_s`` naming what it serves."""
    deadline = time.monotonic() + wait_s
    while True:
        served = served_model(url)
        if served.version == version:
            return served
        if time.monotonic() >= deadline:
            raise DeploymentError(
                f"{served.url} still serves {served.version} ({served.ref}) after {wait_s:g} s, not {version}"
            )
        time.sleep(poll_s)
