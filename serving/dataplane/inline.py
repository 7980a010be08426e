"""Small unary requests on quick graphs, run on the event loop itself (issue 20, item 6).

Handing a request to a worker thread and back costs two thread switches and a contended
GIL; for lenet5, whose graph runs in tens of microseconds, that is most of a request
(docs/BENCHMARKS.md, "Small requests on quick graphs run on the event loop"). Work on
the loop delays everything else it serves, so only bounded work runs there:
- the model is quick: the median of its recent runs (`RunTimes`, measured on the
  requests themselves, either place) is at most INLINE_RUN_US, so a model starts on the
  pool and moves to the loop once it has shown itself quick, and back if it slows;
- the request is small: an image that is a PNG of at most INLINE_PIXELS (read from its
  header, before decoding) and INLINE_IMAGE_BYTES, a tensor of at most INLINE_BYTES, a
  ModelInfer of at most INLINE_ROWS rows and INLINE_BYTES of inputs;
- a decoder slot is free now (tried without waiting); else the pool, as before.
"""

from __future__ import annotations

import collections
import statistics

import numpy as np

from serving.core.preprocess import png_pixels

INLINE_RUN_US = 200  # a graph's recent median run, at most
INLINE_PIXELS = 128 * 128  # an image's width x height, from its PNG header
INLINE_IMAGE_BYTES = 64 * 1024  # an encoded image
INLINE_BYTES = 256 * 1024  # a request's input tensors together
INLINE_ROWS = 8  # a ModelInfer's batch
RECENT = 16  # runs the median is taken over


class RunTimes:
    """A model's recent graph runs of at most INLINE_ROWS rows, in nanoseconds."""

    def __init__(self):
        self._ns: collections.deque[int] = collections.deque(maxlen=RECENT)

    def add(self, ns: int) -> None:
        self._ns.append(ns)

    @property
    def quick(self) -> bool:
        runs = list(self._ns)
        return len(runs) == RECENT and statistics.median(runs) <= INLINE_RUN_US * 1000


def small_image(data: bytes) -> bool:
    pixels = png_pixels(data)
    return len(data) <= INLINE_IMAGE_BYTES and pixels is not None and pixels <= INLINE_PIXELS


def small_tensors(arrays, rows: int) -> bool:
    return rows <= INLINE_ROWS and sum(np.asarray(a).nbytes for a in arrays) <= INLINE_BYTES
