"""Futures the local engine returns: ``concurrent.futures.Future`` s that are also the tinker SDK's futures.

The contract returns a future from every call, creation included, as the tinker SDK does. Kitchen's loop
treats them as ``concurrent.futures.Future`` (``result``, ``cancel``, ``done``); programs written for the
SDK ``await`` them or call ``result_async()`` / ``coroutine()``, as they do the SDK's
``AwaitableConcurrentFuture``. ``EngineFuture`` is both, so one engine serves both kinds of caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

from tinker.lib.public_interfaces.api_future import APIFuture

T = TypeVar("T")


class EngineFuture(Future[T], APIFuture[T]):
    """A ``concurrent.futures.Future`` with the SDK's ``APIFuture`` surface: awaitable, ``result()``,
    ``result_async(timeout)``, ``coroutine()`` and ``future()``; ``isinstance(f, tinker.APIFuture)`` holds."""

    async def result_async(self, timeout: float | None = None) -> T:
        async with asyncio.timeout(timeout):
            return await asyncio.wrap_future(self)

    def future(self) -> Future[T]:
        return self


def resolved(value: T) -> EngineFuture[T]:
    future: EngineFuture[T] = EngineFuture()
    future.set_result(value)
    return future


def run_now(fn: Callable[[], T]) -> EngineFuture[T]:
    """``fn()``'s value, or its exception, as a finished future: bad input still raises at ``.result()``."""
    future: EngineFuture[T] = EngineFuture()
    try:
        future.set_result(fn())
    except Exception as err:
        future.set_exception(err)
    return future


def submit(executor: Executor, fn: Callable[..., T], *args: Any) -> EngineFuture[T]:
    """``executor.submit(fn, *args)``, returning an ``EngineFuture``. As with the executor's own futures,
    cancelling one before its work starts skips the work."""
    future: EngineFuture[T] = EngineFuture()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    executor.submit(run)
    return future
