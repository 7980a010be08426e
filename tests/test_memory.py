"""The allocator setting that keeps freed image buffers from pinning memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Twelve threads each allocate and free 48 MB in 8 MB blocks, twice: what glibc's
# adaptive mmap threshold keeps in the threads' arenas stays in RSS afterwards.
ALLOCATE_FROM_THREADS = """
import sys, threading
from bench.harness import rss_bytes
from serving.core.memory import fix_mmap_threshold
def rss_mb():
    return rss_bytes() // (1024 * 1024)
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
base = rss_mb()
def work():
    for _ in range(3):
        blocks = [bytearray(b"1") * (8 << 20) for _ in range(6)]
        del blocks
for _ in range(2):
    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(rss_mb() - base)
"""


def _retained_mb(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", ALLOCATE_FROM_THREADS, mode],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_fixed_mmap_threshold_returns_freed_buffers_to_the_system():
    adaptive = _retained_mb("adaptive")
    if adaptive < 20:
        pytest.skip(f"this C library keeps only {adaptive} MB by itself: nothing to fix")
    assert _retained_mb("fixed") < 10, f"glibc's adaptive threshold kept {adaptive} MB"
