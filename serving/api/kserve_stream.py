"""ModelStreamInfer's flow control: requests read while answers go out, in order.

Up to STREAM_WINDOW requests of one stream run at once, so independent sequences on
one stream share a batch; the steps of one sequence run one after another, as sent.
A stream holds at most STREAM_BUDGET_BYTES of requests read and answers not yet taken:
past it the next request is not read (one request of any size always is), so a client
that never reads holds this much at most.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from serving.api.status import Undecodable

# Requests of one ModelStreamInfer stream in flight at once; the next is read when
# the oldest has been answered (answers go out in request order).
STREAM_WINDOW = 32
# Bytes one ModelStreamInfer stream may hold: requests read and not yet answered, and
# answers its client has not taken.
STREAM_BUDGET_BYTES = 32 * 1024 * 1024


async def stream_answers(
    request_iterator: AsyncIterator, respond: Callable[[object], Awaitable], drop: list
) -> AsyncIterator:
    """`respond(request)` for each request, yielded in request order. `drop` gets a
    function that drops everything the stream holds (its stall watchdog calls it)."""
    window = asyncio.Semaphore(STREAM_WINDOW)
    budget = _ByteBudget(STREAM_BUDGET_BYTES)
    answers: asyncio.Queue = asyncio.Queue()  # tasks in request order; None: the end
    last: dict[str, asyncio.Task] = {}  # sequence id -> its latest step on this stream

    async def read():
        try:
            async for request in request_iterator:
                await window.acquire()
                size = 0 if isinstance(request, Undecodable) else request.ByteSize()
                await budget.take(size)
                key = _sequence_key(request)
                answer = _after(last.get(key), respond, request)
                task = asyncio.ensure_future(answer)
                task.add_done_callback(lambda t, n=size: budget.swap(n, t))
                if key is not None:
                    last[key] = task
                    task.add_done_callback(lambda t, k=key: last.get(k) is t and last.pop(k))
                answers.put_nowait(task)
        finally:
            answers.put_nowait(None)

    reader = asyncio.ensure_future(read())

    def drop_everything():  # stalled: its requests and unsent answers go
        reader.cancel()
        while not answers.empty():
            task = answers.get_nowait()
            if task is not None:
                task.cancel()

    drop.append(drop_everything)
    try:
        while (task := await answers.get()) is not None:
            response = await task
            window.release()
            yield response
            budget.give(budget.sizes.pop(task, 0))  # taken by the client
        if not reader.cancelled():  # cancelled: the stream stalled, and says so
            await reader  # a request stream that broke ends this one with its status
    finally:
        drop_everything()


async def _after(previous: asyncio.Task | None, respond, request):
    if previous is not None:  # the previous step of the same sequence goes first
        await asyncio.wait([previous])
    return await respond(request)


def _sequence_key(request) -> str | None:
    """A stream request's sequence id as text (None: not a sequence step), unchecked:
    it orders the steps of one sequence; `kserve_codec.sequence_parameters` validates."""
    if isinstance(request, Undecodable) or "sequence_id" not in request.parameters:
        return None
    value = request.parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    return f"{request.model_name}/{getattr(value, kind)!r}" if kind else None


class _ByteBudget:
    """The bytes one ModelStreamInfer stream holds, used from the event loop only:
    requests read and not yet answered, then their answers until the client takes them."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.sizes: dict[asyncio.Task, int] = {}  # an answered request -> its answer's bytes
        self._freed = asyncio.Event()

    async def take(self, size: int) -> None:
        """Wait until `size` more bytes fit (at once when nothing is held)."""
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        self._freed.set()

    def swap(self, request_size: int, task: asyncio.Task) -> None:
        """A request was answered: its bytes go, its answer's stay until taken."""
        answer = 0 if task.cancelled() else task.result().ByteSize()
        self.sizes[task] = answer
        self.give(request_size - answer)
