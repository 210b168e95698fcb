"""File locks for the first use of shared stores under ``KITCHEN_HOME``.

Two ``kitchen run`` processes started together on a fresh home both find the Dagster instance, the
MLflow database or the model cache missing and both create it; SQLite then fails one of them with
``table runs already exists``. Whatever creates a store does it inside ``file_lock`` (or ``once``), so
the second process waits and then finds the store made.

Locks are ``fcntl.flock`` advisory locks on a file beside the store: released by the kernel when the
holder exits, however it exits, so a killed process never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_POLL_S = 0.1


def lock_path(store: Path) -> Path:
    """The lock file guarding ``store`` (a file or directory): a hidden sibling, ``.<name>.lock``.
    For stores that may live anywhere (an SQLite file named by a tracking URI)."""
    return store.parent / f".{store.name}.lock"


def home_lock(name: str) -> Path:
    """The lock file for a store inside the Kitchen home: ``$KITCHEN_HOME/locks/<name>.lock``, so cache
    directories hold only what they cache."""
    from kitchen.home import home_dir

    return home_dir("locks") / f"{name}.lock"


@contextmanager
def file_lock(path: Path, *, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Waits for another holder; with ``timeout_s`` gives up after that long with a ``TimeoutError``
    naming the lock file, rather than waiting forever on a wedged process.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"another process has held {path} for over {timeout_s:.0f}s; if none is "
                            "running, delete the file"
                        ) from None
                    time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def once(done: Callable[[], bool], make: Callable[[], T], lock: Path) -> T | None:
    """Run ``make()`` unless ``done()``; checked again under ``lock``, so of several processes racing
    to create the same thing exactly one does and the others wait for it. Returns ``make()``'s result,
    or None when it was already done."""
    if done():
        return None
    with file_lock(lock):
        if done():
            return None
        return make()
