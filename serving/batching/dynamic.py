"""Dynamic batching for unary calls, beside the model (Triton's dynamic batcher).

Requests for one model queue here; a thread per model takes them in batches of up
to `max_batch_size`: at once when the queue holds a preferred size (or the maximum),
otherwise when the oldest request has waited `max_queue_delay_us` (0, Triton's
default: whatever queued while the previous batch ran). The model stays a function of
a batch (`run(x: [B, ...]) -> [B] results`); the batcher owns queueing, timing and
splitting. A row that fails (its output not finite) fails alone; a batch whose run
raises is retried one row at a time, so one bad request cannot fail its neighbours.
No gRPC here: the servicer awaits `submit`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from serving.core.leases import Leases
from serving.errors import ResourceExhausted, Unavailable
from serving.metrics.statistics import ModelStats, RequestTiming

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingConfig:
    # 1, the default (as in Triton without `dynamic_batching`), turns batching off:
    # requests run on their own threads. On our 2-core measurements batching did not pay
    # yet (docs/BENCHMARKS.md): per-request transport work dominates a 60 us model.
    max_batch_size: int = 1
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256  # past it, RESOURCE_EXHAUSTED at once

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue_delay_us < 0 or self.max_queue_size < 1:
            raise ValueError(
                "max_batch_size and max_queue_size must be at least 1, max_queue_delay_us >= 0"
            )


@dataclass
class _Request:
    x: np.ndarray
    arrival: float
    future: Future
    timing: RequestTiming | None = None  # marked: queue until its batch runs, then infer


class DynamicBatcher:
    """One model's queue and the thread that runs it in batches."""

    def __init__(
        self,
        name: str,
        run: Callable[[np.ndarray], list],
        config: BatchingConfig,
        stats: ModelStats | None = None,
    ):
        """`run(x: [B, ...])` returns B results, each a value or an Exception for that row.
        Each batch run counts as one execution in `stats` (the model's; a new one when
        not given)."""
        self.name, self.run, self.config = name, run, config
        self.stats = stats if stats is not None else ModelStats()
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()  # re-entrant (an RLock): enqueue_rows
        self._closed = False
        self._running = False  # a batch taken and not yet delivered
        self._leases = Leases()  # requests that picked this batcher and are not done
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def enqueue(self, x: np.ndarray, timing: RequestTiming | None = None) -> Future:
        """Queue one input row; its future gets the row's result or exception. `timing`,
        if given, gets the row's time in the queue and in its batch's run."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name}: the server is shutting down")
            if len(self._queue) >= self.config.max_queue_size:
                raise ResourceExhausted(
                    f"{self.name}: {self.config.max_queue_size} requests are already queued; "
                    "retry later"
                )
            self._queue.append(_Request(x, time.monotonic(), future, timing))
            self._cond.notify()
        return future

    def enqueue_rows(self, x: np.ndarray, timing: RequestTiming | None = None) -> list[Future]:
        """Queue every row of `x` [B, ...] (each answered on its own future), or none:
        a request the queue cannot take whole is refused before any row of it runs."""
        with self._cond:
            room = self.config.max_queue_size - len(self._queue)
            if len(x) > room and not self._closed:
                raise ResourceExhausted(
                    f"{self.name}: a request of {len(x)} rows and room for {max(room, 0)} "
                    f"in the queue (at most {self.config.max_queue_size}); retry later"
                )
            return [self.enqueue(row, timing) for row in x]  # re-entrant: one lock

    def submit(self, x: np.ndarray, timeout: float | None = None):
        """One input row -> its result (raises the row's exception), waiting for it."""
        return self.enqueue(x).result(timeout)

    @property
    def batch_sizes(self) -> Counter:
        """Batch size -> batches run (read from the model's statistics)."""
        return self.stats.batch_sizes

    def lease(self):
        """Held by a request from the moment it picks this batcher until its rows are
        answered (`serving.core.leases`)."""
        return self._leases.hold()

    def pending(self) -> int:
        """Rows queued, not yet taken into a batch."""
        with self._cond:
            return len(self._queue)

    def busy(self) -> bool:
        """Whether requests hold it, are queued or running."""
        with self._cond:
            return self._leases.held or bool(self._queue) or self._running

    def close(self) -> None:
        """Stop the thread; requests still queued fail with UNAVAILABLE."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._cond.notify()
        for request in queued:  # a request its caller cancelled is left as it is
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(
                    Unavailable(f"{self.name}: the server is shutting down")
                )

    def _take(self) -> list[_Request] | None:
        """Wait for a batch by the rules above; None once closed."""
        c = self.config
        delay = c.max_queue_delay_us / 1e6
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = self._queue[0].arrival + delay
            while True:
                n = len(self._queue)
                if n >= c.max_batch_size or n in c.preferred_batch_sizes:
                    break
                if c.preferred_batch_sizes and n > max(c.preferred_batch_sizes):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            size = min(len(self._queue), c.max_batch_size)
            self._running = True
            return [self._queue.popleft() for _ in range(size)]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            try:
                # Requests whose callers gave up (a deadline, a cancelled RPC) drop out
                # here; the rest can no longer be cancelled, only answered.
                batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
                if not batch:
                    continue
                for request in batch:
                    if request.timing is not None:
                        request.timing.mark("queue")
                start = time.perf_counter_ns()
                results = self._run(batch)
                self.stats.execution(len(batch), time.perf_counter_ns() - start)
                for request in batch:
                    if request.timing is not None:
                        request.timing.mark("infer")
                if len(results) != len(batch):
                    raise ValueError(f"{len(results)} results for a batch of {len(batch)}")
                for request, result in zip(batch, results, strict=True):
                    if isinstance(result, Exception):
                        request.future.set_exception(result)
                    else:
                        request.future.set_result(result)
            except Exception:  # noqa: BLE001 - the thread must outlive any one batch
                log.exception("%s: a batch could not be delivered", self.name)
                failure = RuntimeError(f"{self.name}: the batch failed")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(failure)
            finally:
                with self._cond:
                    self._running = False

    def _run(self, batch: list[_Request]) -> list:
        try:
            return self.run(np.stack([r.x for r in batch]))
        except Exception:  # noqa: BLE001 - find the row that breaks the run
            if len(batch) == 1:
                log.exception("%s: a batch of one failed", self.name)
                return [RuntimeError(f"{self.name}: the model run failed")]
            return [self._alone(r) for r in batch]

    def _alone(self, request: _Request):
        try:
            return self.run(request.x[None])[0]
        except Exception as exc:  # noqa: BLE001 - this row alone fails
            log.exception("%s: a request failed the model run", self.name)
            return exc
