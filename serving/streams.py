"""Admission and liveness for long-lived response streams, without gRPC.

Each `Generate` or `Caption` stream holds a slot (not a thread) until it ends. Three rules keep one
client from holding them all:
- a global cap (`max_streams`): past it, a new stream is refused at once;
- a per-connection cap (`max_per_connection`): one connection cannot take every slot;
- a stall watchdog: a stream whose last message has waited longer than
  `stall_timeout_s` to be taken by the client (an HTTP/2 flow-control window that
  never reopens) is cancelled through the `cancel` callable it registered, and its
  slot is freed. The transport hands messages over one at a time and asks for the
  next only once the previous one is written, so "yielded and not yet resumed" is
  exactly "the client is not reading".

The counters (`admitted`, `refused`, `stalled`) are what tests and metrics read.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from serving.errors import ResourceExhausted

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    id: int
    connection: str
    cancel: Callable[[], None]
    waiting_since: float | None = None  # a message is out and not yet taken
    cancelled: bool = False
    released: bool = False  # its connection's share is given back


class StreamSlots:
    def __init__(
        self,
        max_streams: int,
        max_per_connection: int,
        stall_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 1 <= max_per_connection:
            raise ValueError(f"max_per_connection must be at least 1, not {max_per_connection}")
        self.max_streams = max_streams
        self.max_per_connection = min(max_per_connection, max_streams)
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        self.admitted = self.refused = self.stalled = 0
        self._lock = threading.Lock()
        self._live: dict[int, _Stream] = {}
        self._per_connection: Counter[str] = Counter()
        self._ids = itertools.count()
        self._watchdog: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def live(self) -> int:
        return len(self._live)

    async def run(
        self, events: AsyncIterator, connection: str, cancel: Callable[[], None]
    ) -> AsyncIterator:
        """Yield `events` while holding a slot for `connection`; refuse at once
        (ResourceExhausted) when the global or the connection's cap is reached.
        `cancel` must be safe to call from the watchdog's thread."""
        stream = self._admit(connection, cancel)
        try:
            async for event in events:
                stream.waiting_since = self.clock()
                yield event
                stream.waiting_since = None
        finally:
            self._release(stream)

    def _admit(self, connection: str, cancel: Callable[[], None]) -> _Stream:
        with self._lock:
            if len(self._live) >= self.max_streams:
                self.refused += 1
                raise ResourceExhausted(f"all {self.max_streams} streams are busy; retry later")
            if self._per_connection[connection] >= self.max_per_connection:
                self.refused += 1
                raise ResourceExhausted(
                    f"this connection already has {self.max_per_connection} streams open, "
                    "the most one connection may hold; retry when one ends or open another"
                )
            stream = _Stream(next(self._ids), connection, cancel)
            self._live[stream.id] = stream
            self._per_connection[connection] += 1
            self.admitted += 1
            if self._watchdog is None and self.stall_timeout_s > 0:
                self._watchdog = threading.Thread(
                    target=self._watch, name="stream-watchdog", daemon=True
                )
                self._watchdog.start()
            return stream

    def _release(self, stream: _Stream) -> None:
        """The stream ended: its global slot (if the watchdog has not freed it already)
        and its connection's share."""
        with self._lock:
            self._live.pop(stream.id, None)
            if not stream.released:
                stream.released = True
                self._per_connection[stream.connection] -= 1
                if not self._per_connection[stream.connection]:
                    del self._per_connection[stream.connection]

    def check_stalls(self) -> int:
        """Cancel every stream whose client has not taken a message for too long; the
        number cancelled. The watchdog thread calls this; tests may too."""
        now, stalled = self.clock(), []
        with self._lock:
            for stream in self._live.values():
                since = stream.waiting_since
                if not stream.cancelled and since is not None:
                    if now - since > self.stall_timeout_s:
                        stream.cancelled = True
                        stalled.append(stream)
            self.stalled += len(stalled)
        for stream in stalled:  # outside the lock: cancel may call back into the transport
            log.warning(
                "cancelling a stream of %s: its client took no message for %.1f s",
                stream.connection,
                self.stall_timeout_s,
            )
            stream.cancel()
            # Its global slot is free now; its connection keeps the share until the
            # transport ends the stream (when that client reads again or goes away), so
            # a client that never reads cannot open streams without bound.
            with self._lock:
                self._live.pop(stream.id, None)
        return len(stalled)

    def _watch(self) -> None:
        """Check for stalls while any stream is live; exit when none is (the next
        admitted stream starts a new watchdog), so an idle server holds no thread."""
        interval = min(1.0, max(0.05, self.stall_timeout_s / 4))
        while not self._stopped.wait(interval):
            try:
                self.check_stalls()
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one stream
                log.exception("stream watchdog")
            with self._lock:
                if not self._live:
                    self._watchdog = None
                    return

    def close(self) -> None:
        self._stopped.set()
