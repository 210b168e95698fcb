"""Writing a directory atomically: build it in a hidden staging directory beside the target, then rename.

    with atomic_directory(target, already_done=lambda t: (t / "meta.json").is_file()) as staging:
        write_everything_into(staging)

A reader never sees a half-written ``target``: the staging directory is a sibling (same file system, so
the rename is atomic), hidden (``.<name>-...``) and removed on any failure, a crash mid-write included,
leaving ``target`` as it was. What an existing ``target`` means is the caller's to say, because the call
sites differ:

- content-addressed results (datasets, datums, reference logprobs, teacher samples): a concurrent writer
  may have produced the same result first; ``already_done(target)`` says whether it did, and then this
  copy is dropped and the block counts as done. Otherwise the failed rename is raised.
- ``replace=True`` (checkpoints, a model cache rebuilt under its lock): the old directory is swapped out by
  two renames and then deleted, so a reader sees the old one, briefly nothing, then the new one, never a
  mixture; if the second rename fails the old one is put back.
- neither: ``rename`` decides. An empty directory is replaced (POSIX), a non-empty one fails the rename.

``durable=True`` fsyncs every file and then the parent directory (checkpoints must survive a power cut).
``private=False`` gives the directory the permissions ``mkdir`` would (``mkdtemp`` makes it 0700), for
folders meant for others (an export).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(
    target: Path,
    *,
    already_done: Callable[[Path], bool] | None = None,
    replace: bool = False,
    durable: bool = False,
    private: bool = True,
) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``target`` when the block completes (see the module)."""
    if replace and already_done is not None:
        raise ValueError("atomic_directory: replace and already_done are exclusive")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)
        yield staging
        if durable:
            for path in staging.rglob("*"):
                if path.is_file():
                    fsync(path)
        try:
            if replace:
                _swap_into_place(staging, target)
            else:
                staging.rename(target)
        except OSError:
            if already_done is None or not already_done(target):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # a concurrent writer's identical result won
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if durable:
        fsync(target.parent)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.parent / f".{target.name}.retired-{uuid.uuid4().hex[:8]}"
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
