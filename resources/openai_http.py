"""POST to an OpenAI-compatible endpoint with a key from the environment, a bounded timeout and bounded
retries; every failure is one line naming the endpoint and what to do, never the key."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

#: Worth retrying: the server was busy or briefly down.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def api_key(env_name: str | None) -> str | None:
    """The key in ``$env_name`` (``None`` when no name is given; an unset variable is an error)."""
    if not env_name:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise ValueError(f"${env_name} is empty or unset: export the endpoint's API key there")
    return value


def post_json(
    base_url: str,
    path: str,
    payload: dict[str, Any],
    *,
    key_env: str | None,
    timeout_s: float,
    max_retries: int,
    error: type[Exception],
    backoff_s: float = 0.5,
) -> dict[str, Any]:
    """``POST {base_url}/{path}`` and the JSON reply; raises ``error`` (one line) when it cannot."""
    url = f"{base_url.rstrip('/')}/{path.lstrip('/')}"
    try:
        key = api_key(key_env)
    except ValueError as bad:
        raise error(str(bad)) from None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            response = httpx.post(url, json=payload, headers=headers, timeout=timeout_s)
        except httpx.TimeoutException:
            last = f"no reply within {timeout_s:g} s"
            continue
        except httpx.HTTPError as failure:
            last = f"cannot connect ({type(failure).__name__})"
            continue
        if response.status_code in (401, 403):
            where = f"the key in ${key_env}" if key_env else "no key (set api_key_env)"
            raise error(f"{url} refused {where} (HTTP {response.status_code}); check the key")
        if response.status_code in RETRY_STATUSES:
            last = f"HTTP {response.status_code}"
            continue
        if response.status_code >= 400:
            detail = " ".join(response.text.split())[:200]
            raise error(f"{url} answered HTTP {response.status_code}: {detail}")
        try:
            body = response.json()
        except ValueError:
            raise error(f"{url} answered with something that is not JSON; is it OpenAI-compatible?") from None
        if not isinstance(body, dict):
            raise error(f"{url} answered with a JSON {type(body).__name__}, not an object")
        return body
    raise error(
        f"{url}: {last} after {max_retries + 1} attempt(s); check that the endpoint is up and the URL right"
    )
