"""Small unary requests on quick graphs, run on the event loop itself (issue 20, item 6).

Handing a request to a worker thread and back costs two thread switches and a contended
GIL; for lenet5, whose graph runs in tens of microseconds, that is most of a request
(docs/BENCHMARKS.md, "Small requests on quick graphs run on the event loop"). Work on
the loop delays everything else it serves, so only bounded work runs there:
- the model is quick: the median of its recent runs per row (`RunTimes`, measured on
  the requests themselves, either place) times the request's rows is at most
  INLINE_RUN_US, at a row count it has run before; a model starts on the pool, moves to
  the loop once it has shown itself quick, and goes back if it slows;
- the request is small: an image that is a PNG of at most INLINE_PIXELS (read from its
  header, before decoding) and INLINE_IMAGE_BYTES, holding only the chunks a plain image
  needs (`plain_png`: a compressed text or profile chunk can inflate to megabytes), or a
  ModelInfer of at most INLINE_ROWS rows and INLINE_BYTES of inputs (a stepwise Classify
  tensor is decoded on the pool);
- the loop has time: inline work took less than INLINE_SHARE of the last
  INLINE_WINDOW_S (`LoopBudget`), so a flood of small requests cannot starve streams
  and health checks;
- a decoder slot is free now (tried without waiting); else the pool, as before.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import struct
import threading
import time

import numpy as np

from serving.core.preprocess import PNG_SIGNATURE

INLINE_RUN_US = 200  # a request's expected run: its rows x the recent median per row
INLINE_PIXELS = 128 * 128  # an image's width x height, from its PNG header
INLINE_IMAGE_BYTES = 64 * 1024  # an encoded image
INLINE_BYTES = 256 * 1024  # a request's input tensors together
INLINE_ROWS = 8  # a ModelInfer's batch
RECENT = 16  # runs the median is taken over
INLINE_WINDOW_S = 0.1
INLINE_SHARE = 0.5  # of each window, at most, inline work may take
# The chunks a plain PNG needs, and small uncompressed ones it may carry; anything else
# (zTXt, iTXt, iCCP: compressed; unknown ones) sends the image to the pool.
PNG_CHUNKS = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"gAMA", b"cHRM", b"sRGB",
              b"pHYs", b"bKGD", b"sBIT", b"tIME", b"tEXt"}  # fmt: skip
MAX_PNG_CHUNKS = 64


class RunTimes:
    """A model's recent graph runs of at most INLINE_ROWS rows: nanoseconds per row, and
    the row counts it has run at (a new shape may make ONNX Runtime plan again)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ns_per_row: collections.deque[float] = collections.deque(maxlen=RECENT)
        self._rows: set[int] = set()

    def add(self, ns: int, rows: int = 1) -> None:
        """A run of `rows` rows took `ns` (larger batches never run inline: not kept)."""
        if rows > INLINE_ROWS:
            return
        with self._lock:
            self._ns_per_row.append(ns / max(rows, 1))
            self._rows.add(rows)

    def quick(self, rows: int = 1) -> bool:
        with self._lock:
            runs, seen = list(self._ns_per_row), rows in self._rows
        return (
            seen and len(runs) == RECENT and statistics.median(runs) * rows <= INLINE_RUN_US * 1000
        )


class LoopBudget:
    """How much of the loop's recent time inline work took (used on the loop only)."""

    def __init__(self, window_s: float = INLINE_WINDOW_S, share: float = INLINE_SHARE):
        self.window_ns, self.allowed_ns = int(window_s * 1e9), int(window_s * share * 1e9)
        self._start, self._used = 0, 0

    def allows(self) -> bool:
        now = time.perf_counter_ns()
        if now - self._start > self.window_ns:
            self._start, self._used = now, 0
        return self._used < self.allowed_ns

    def spend(self, ns: int) -> None:
        self._used += ns

    @contextlib.contextmanager
    def spending(self):
        """The time the block takes (whatever it raises) counts as inline work."""
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self.spend(time.perf_counter_ns() - start)


def plain_png(data: bytes) -> bool:
    """Whether `data` is a PNG of at most INLINE_PIXELS and INLINE_IMAGE_BYTES holding
    only PNG_CHUNKS, at most MAX_PNG_CHUNKS of them (read without decoding)."""
    if len(data) > INLINE_IMAGE_BYTES or data[:8] != PNG_SIGNATURE:
        return False
    offset, chunks = 8, 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        chunks += 1
        if kind not in PNG_CHUNKS or chunks > MAX_PNG_CHUNKS:
            return False
        if kind == b"IHDR":
            if chunks != 1 or length < 8 or offset + 16 > len(data):
                return False
            width, height = struct.unpack_from(">II", data, offset + 8)
            if width * height > INLINE_PIXELS:
                return False
        elif chunks == 1:  # IHDR comes first
            return False
        if kind == b"IEND":
            return True
        offset += 12 + length
    return False  # cut short: the decoder's error, on the pool


def small_tensors(arrays, rows: int) -> bool:
    return rows <= INLINE_ROWS and sum(np.asarray(a).nbytes for a in arrays) <= INLINE_BYTES
