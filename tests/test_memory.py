"""Memory a finished phase freed goes back to the operating system."""

from __future__ import annotations

import sys

import psutil
import pytest
import torch

from kitchen.memory import release_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_tensors_leave_the_resident_set() -> None:
    """300 MB of 64 KB tensors (below glibc's mmap threshold, so on the heap, as activations are): freeing
    them leaves them resident until ``release_freed_memory`` hands them back."""
    process = psutil.Process()
    keep = torch.ones(16)  # something allocated after them, so the heap cannot simply shrink from its top
    tensors = [torch.ones(16 * 1024) for _ in range(4800)]
    keep = torch.ones(16)
    with_tensors = process.memory_info().rss
    del tensors
    freed = process.memory_info().rss
    release_freed_memory()
    released = process.memory_info().rss
    # The drop is the release's, not the del's.
    assert freed - released > 200e6, (with_tensors, freed, released)
    assert keep.sum() == 16
