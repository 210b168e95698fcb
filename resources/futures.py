"""Futures for work a backend finishes before returning (client creation, local snapshots).

The contract returns a future from every call, creation included, as the tinker SDK does; a backend that
does the work synchronously hands back one of these, already resolved or failed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def resolved(value: T) -> Future[T]:
    future: Future[T] = Future()
    future.set_result(value)
    return future


def run_now(fn: Callable[[], T]) -> Future[T]:
    """``fn()``'s value, or its exception, as a finished future: bad input still raises at ``.result()``."""
    future: Future[T] = Future()
    try:
        future.set_result(fn())
    except Exception as err:
        future.set_exception(err)
    return future
