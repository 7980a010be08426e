"""Admission and liveness for long-lived response streams, without gRPC.

Each `Generate`, `Caption` or `ModelStreamInfer` stream holds a slot (not a thread)
until it ends. The rules keep one client from holding them all, and never refuse an
ordinary client for multiplexing calls over one connection:
- a global cap (`max_streams`): past it, a new stream waits for a slot instead of
  being refused; only when `max_waiting` streams already wait is it refused at once;
- fair admission: when a slot frees, it goes to the waiting client that holds the
  fewest streams (the longest-waiting among equals), so no client grows past its
  share while others wait, however many connections or streams it opens; a client
  is who `serving.api.clients.client_identity` says (a host, a certificate, a proxy's
  header), not a connection;
- a per-client cap (`max_per_client`, default `max_streams`): a client's streams past
  it wait even with slots free;
- a stall watchdog: a stream whose last message has waited longer than
  `stall_timeout_s` to be taken by the client (an HTTP/2 flow-control window that
  never reopens) is cancelled through the `cancel` callable it registered, and its
  global slot is freed. The transport hands messages over one at a time and asks for
  the next only once the previous one is written, so "yielded and not yet resumed" is
  exactly "the client is not reading". Until the transport ends it, the stalled
  stream still counts against its client's cap, so a client that never reads cannot
  open streams without bound.

The counters (`admitted`, `refused`, `stalled`, `waited`) are what tests and metrics
read.
"""

from __future__ import annotations

import asyncio
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
    client: str
    cancel: Callable[[], None]
    waiting_since: float | None = None  # a message is out and not yet taken
    cancelled: bool = False
    released: bool = False  # its client's share is given back


@dataclass
class _Waiter:
    order: int
    client: str
    cancel: Callable[[], None]  # the stream's, once admitted
    wake: Callable[[], None]  # thread-safe: tells the waiting coroutine it is admitted
    admitted: _Stream | None = None


class StreamSlots:
    def __init__(
        self,
        max_streams: int,
        max_per_client: int | None = None,
        stall_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_waiting: int | None = None,
    ):
        max_per_client = max_streams if max_per_client is None else max_per_client
        if max_streams < 1 or max_per_client < 1:
            raise ValueError(
                f"max_streams and max_per_client must be at least 1, not "
                f"{max_streams} and {max_per_client}"
            )
        self.max_streams = max_streams
        self.max_per_client = min(max_per_client, max_streams)
        self.max_waiting = max_streams if max_waiting is None else max_waiting
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        self.admitted = self.refused = self.stalled = self.waited = 0
        self._lock = threading.Lock()
        self._live: dict[int, _Stream] = {}  # streams holding a global slot
        self._per_client: Counter[str] = Counter()  # live and stalled, per client
        self._waiting: dict[int, _Waiter] = {}
        self._ids = itertools.count()
        self._watchdog: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def live(self) -> int:
        return len(self._live)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def held(self, client: str) -> int:
        """Streams `client` holds: running, or stalled and not yet ended."""
        return self._per_client[client]

    async def run(
        self, events: AsyncIterator, client: str, cancel: Callable[[], None]
    ) -> AsyncIterator:
        """Yield `events` while holding a slot for `client`, waiting for one first when
        the rules above say so (ResourceExhausted only when too many wait already).
        `cancel` must be safe to call from the watchdog's thread."""
        stream = await self._admit(client, cancel)
        try:
            async for event in events:
                stream.waiting_since = self.clock()
                yield event
                stream.waiting_since = None
        finally:
            self._release(stream)

    async def _admit(self, client: str, cancel: Callable[[], None]) -> _Stream:
        with self._lock:
            if not self._waiting and self._room(client):
                return self._take(client, cancel)
            if len(self._waiting) >= self.max_waiting:
                self.refused += 1
                raise ResourceExhausted(
                    f"all {self.max_streams} streams are busy and {len(self._waiting)} "
                    "wait for one, the most allowed; retry later"
                )
            loop, admitted = asyncio.get_running_loop(), asyncio.Event()
            wake = lambda: loop.call_soon_threadsafe(admitted.set)  # noqa: E731
            waiter = _Waiter(next(self._ids), client, cancel, wake)
            self._waiting[waiter.order] = waiter
            self.waited += 1
            self._dispatch()  # a slot may be free for it (another client was at its cap)
        try:
            await admitted.wait()
        except BaseException:  # cancelled or timed out while waiting: leave no trace
            with self._lock:
                self._waiting.pop(waiter.order, None)
                stream = waiter.admitted
            if stream is not None:
                self._release(stream)
            raise
        return waiter.admitted

    def _room(self, client: str) -> bool:
        return len(self._live) < self.max_streams and self._per_client[client] < self.max_per_client

    def _take(self, client: str, cancel: Callable[[], None]) -> _Stream:
        """Under the lock: a slot for `client`."""
        stream = _Stream(next(self._ids), client, cancel)
        self._live[stream.id] = stream
        self._per_client[client] += 1
        self.admitted += 1
        if self._watchdog is None and self.stall_timeout_s > 0:
            self._watchdog = threading.Thread(
                target=self._watch, name="stream-watchdog", daemon=True
            )
            self._watchdog.start()
        return stream

    def _dispatch(self) -> None:
        """Under the lock: give free slots to waiting clients, the one holding the
        fewest streams first (the longest waiting among equals)."""
        while self._waiting and len(self._live) < self.max_streams:
            eligible = [w for w in self._waiting.values() if self._room(w.client)]
            if not eligible:
                return
            waiter = min(eligible, key=lambda w: (self._per_client[w.client], w.order))
            del self._waiting[waiter.order]
            waiter.admitted = self._take(waiter.client, waiter.cancel)
            waiter.wake()

    def _release(self, stream: _Stream) -> None:
        """The stream ended: its global slot (if the watchdog has not freed it already)
        and its client's share."""
        with self._lock:
            self._live.pop(stream.id, None)
            if not stream.released:
                stream.released = True
                self._per_client[stream.client] -= 1
                if not self._per_client[stream.client]:
                    del self._per_client[stream.client]
            self._dispatch()

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
                stream.client,
                self.stall_timeout_s,
            )
            stream.cancel()
            # Its global slot is free now; its client keeps the share until the
            # transport ends the stream (when that client reads again or goes away).
            with self._lock:
                self._live.pop(stream.id, None)
                self._dispatch()
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
