"""A stream of one Generate or Caption, and the reader that awaits an engine outbox from
the event loop, without a transport."""

from __future__ import annotations

import asyncio
import threading

from serving.engine import Delta, Sequence
from serving.errors import Cancelled


class Stream:
    """One Generate or Caption stream: an async iterator of `Delta`s, everything the
    stream produced since the previous one. Nothing runs until it is iterated (inside
    the transport's stream slot): then it leases its model's deployment, builds the
    sequence on the worker pool (it may decode an image), submits it to the engine and
    yields its deltas. `cancel` is safe from any thread: the row leaves the batch at
    the next iteration and the iteration raises `error`. A cancelled, timed-out or
    disconnected stream (its task cancelled) leaves the batch at the next iteration."""

    def __init__(self, plane, model, build, deadline, timing):
        self.plane, self.model, self.build = plane, model, build
        self.deadline, self.timing = deadline, timing
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
                seq.deadline = self.deadline
                reader = OutboxReader(seq.outbox)
                self._live = engine, seq
                engine.submit(seq)
                try:
                    while True:
                        delta = await reader.next()
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
        loop, self._outbox, self._ready = asyncio.get_running_loop(), outbox, asyncio.Event()
        outbox.on_ready = lambda: loop.call_soon_threadsafe(self._ready.set)

    async def next(self) -> Delta:
        """Everything the sequence produced since the previous call, waiting for some."""
        while True:
            self._ready.clear()
            delta = self._outbox.take_or_arm()
            if delta is not None:
                return delta
            await self._ready.wait()
