"""Memory a finished phase freed goes back to the operating system."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh interpreter (a test worker's heap holds whatever earlier tests left): 300 MB of 64 KB tensors,
# below glibc's mmap threshold and so on the heap, as activations are, with a small tensor allocated after
# them so the heap cannot simply shrink from its top.
_SCRIPT = """
import json, psutil, torch
from kitchen.memory import release_freed_memory
process = psutil.Process()
tensors = [torch.ones(16 * 1024) for _ in range(4800)]
keep = torch.ones(16)
with_tensors = process.memory_info().rss
del tensors
freed = process.memory_info().rss
release_freed_memory()
print(json.dumps([with_tensors, freed, process.memory_info().rss, float(keep.sum())]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_tensors_leave_the_resident_set() -> None:
    """Freed tensors stay resident until ``release_freed_memory`` hands them back."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True)
    with_tensors, freed, released, kept = json.loads(out.stdout.strip().splitlines()[-1])
    assert kept == 16
    assert with_tensors - freed < 100e6, "freeing alone should leave them resident on the heap"
    assert freed - released > 200e6, (with_tensors, freed, released)
