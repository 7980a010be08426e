"""Process-wide allocator settings that keep a burst of big requests from pinning memory.

Measured with `bench/memory_burst.py` (docs/BENCHMARKS.md): after 16 concurrent
4000x4000 images, RSS stayed ~800 MiB above its baseline for good, and no object was
alive: glibc's malloc had kept the freed image buffers. It raises its mmap threshold
to the size of each large block it frees (up to 32 MiB), so the next image's blocks
come from the heap of whichever RPC thread decoded it, and each of those per-thread
arenas keeps what it once held. A fixed threshold stops that: every allocation of at
least `mmap_threshold` bytes is its own mapping, returned to the system when freed.
Only big, short-lived buffers (decoded images) are that large on our request paths;
ONNX Runtime keeps its own arena, small objects stay in malloc's heaps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
DEFAULT_MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Serve allocations of `threshold` bytes or more with their own mappings (glibc's
    `mallopt(M_MMAP_THRESHOLD)`, which also disables its dynamic adjustment). False
    where the C library has no `mallopt` (musl, macOS): nothing changes there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("no mallopt in this C library (%s): allocator settings unchanged", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
