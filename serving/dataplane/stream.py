"""A stream of one Generate or Caption, and the reader that awaits an engine outbox from
the event loop, without a transport."""

from __future__ import annotations

import asyncio
import threading
import time

from serving.engine import Delta, Sequence
from serving.engine.request import Waker
from serving.errors import Cancelled


class Stream:
    """One Generate or Caption stream: an async iterator of `Delta`s, everything the
    stream produced since the previous one. Nothing runs until it is iterated (inside
    the transport's stream slot): then it leases its model's deployment, builds the
    sequence on the worker pool (it may decode an image), submits it to the engine and
    yields its deltas. `cancel` is safe from any thread: the row leaves the batch at
    the next iteration and the iteration raises `error`. A cancelled, timed-out or
    disconnected stream (its task cancelled) leaves the batch at the next iteration.

    With `interval_s`, everything produced within `interval_s` of the oldest part not
    yet yielded goes out in one delta (coalesced streaming): the first token and the
    end are yielded at once, and nothing waits longer than the interval."""

    def __init__(self, plane, model, build, deadline, timing, interval_s: float = 0.0):
        self.plane, self.model, self.build = plane, model, build
        self.deadline, self.timing, self.interval_s = deadline, timing, interval_s
        self._error: Exception | None = None
        self._cancelled = threading.Event()
        self._live: tuple | None = None  # (engine, sequence) once submitted

    def cancel(self, error: Exception | None = None) -> None:
        self._error = error or Cancelled("the stream was cancelled")
        self._cancelled.set()
        live = self._live
        if live is not None:
            live[0].cancel(live[1])

    async def __aiter__(self):
        with self.plane.timed(self.model, self.timing) as timing:
            deployment = self.plane.deployment_of(self.model)
            with deployment.lease():  # a reload retires it only after this stream
                engine = deployment.engine
                seq: Sequence = await self.plane.blocking(self.build)  # or a BeamSearch
                timing.mark("input")
                seq.deadline, seq.interval_s = self.deadline, self.interval_s
                reader = OutboxReader(seq.outbox)
                self._live = engine, seq
                engine.submit(seq)
                try:
                    interval = 0.0  # the first token goes out at once
                    while True:
                        delta = await reader.next(interval)
                        if delta.tokens or delta.pieces:
                            interval = self.interval_s
                        if delta.error is not None:
                            raise delta.error
                        if delta.finished:  # it waited for a batch row, then ran in it
                            timing.engine(delta.queue_time_us * 1000)
                        yield delta
                        if self._cancelled.is_set():
                            raise self._error
                        if delta.finished:
                            return
                finally:
                    engine.cancel(seq)  # a no-op once it finished; else it leaves at once


class OutboxReader:
    """Awaits an engine outbox from the event loop: the engine's thread wakes the loop
    once per wait (the outbox is armed only while nothing is there to take)."""

    def __init__(self, outbox):
        self._loop, self._outbox, self._ready = asyncio.get_running_loop(), outbox, asyncio.Event()
        # A coalescing reader's wake-ups join the engine iteration's others (one call
        # into the loop per iteration); a reader of every token is woken at once, so the
        # loop sends while the engine still delivers (measured: docs/BENCHMARKS.md).
        self._waker = outbox.on_ready = Waker(self._loop, self._ready)

    async def next(self, interval_s: float = 0.0) -> Delta:
        """Everything the sequence produced since the previous call, waiting for some;
        with `interval_s`, also what it produces until `interval_s` after the oldest of
        it, unless the stream ends first (then at once): coalesced streaming."""
        self._waker.batch = interval_s > 0
        if interval_s <= 0:
            while True:
                self._ready.clear()
                delta = self._outbox.take_or_arm()
                if delta is not None:
                    return delta
                await self._ready.wait()
        while True:
            self._ready.clear()
            if self._outbox.ready_or_arm():
                break
            await self._ready.wait()
        hold = self._outbox.ready_since + interval_s - time.monotonic()
        self._ready.clear()
        if hold > 0 and not self._outbox.ready_or_arm(end_only=True):
            timer = self._loop.call_later(hold, self._ready.set)
            try:
                await self._ready.wait()  # the interval, or the stream's end
            finally:
                timer.cancel()
        return self._outbox.take_or_arm()
