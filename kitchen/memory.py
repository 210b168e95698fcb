"""Handing memory a finished phase freed back to the operating system."""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any


def release_freed_memory() -> None:
    """Collect unreachable objects, then return the C heap's free pages to the OS (glibc's
    ``malloc_trim``). PyTorch's CPU tensors live on that heap, and glibc keeps what was freed (a training
    run's activations, a dequantized model's staging copies: hundreds of MB) mapped for reuse; without
    this a process's resident memory stays at its largest phase for good, and the next phase adds to it.
    Elsewhere (no glibc) only the collection runs."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
