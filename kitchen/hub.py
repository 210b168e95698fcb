"""What "the Hugging Face Hub could not be reached" looks like, as exception types.

``huggingface_hub`` 2.x talks through ``httpx2`` (older releases through ``httpx`` or ``requests``);
callers catch this tuple to turn any of them into one clear error instead of a transport traceback.
"""

from __future__ import annotations

import importlib

from huggingface_hub.errors import OfflineModeIsEnabled


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in ("HTTPError", "TransportError", "RequestException"):
            err = getattr(module, attr, None)
            if isinstance(err, type) and issubclass(err, BaseException):
                found.append(err)
    return tuple(found)


HUB_UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    OfflineModeIsEnabled,
    OSError,
    TimeoutError,
    *_transport_errors(),
)
