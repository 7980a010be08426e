"""serving.api.calls.Calls, the one wrapper around every RPC, over a real channel: its
watchers see every response and the final code, and `end(reason)` ends the calls
still running, unary and streaming, with UNAVAILABLE and the reason (gRPC's own
server stop would say only "Cancelling all calls")."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from serving.api.calls import Calls, RpcWatch

REASON = "the server is shutting down: this call outlived the grace period"


class Recorder:
    """A watcher: every RPC's responses and final code."""

    def __init__(self):
        self.seen: list[tuple[str, list, str]] = []

    def starter(self, details, handler):
        recorder, method = self, details.method

        class Watch(RpcWatch):
            def __init__(self):
                self.responses = []

            def response(self, message):
                self.responses.append(message)

            def done(self, code):
                recorder.seen.append((method, self.responses, code))

        return lambda request, context: Watch()


def _handlers(started: asyncio.Event, cleaned: list):
    async def slow(request, context):
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append("slow")
        return b"never"

    async def ticks(request, context):
        try:
            for i in range(1000):
                yield bytes([i % 256])
                if i == 2:
                    started.set()
                await asyncio.sleep(0.05)
        finally:
            cleaned.append("ticks")

    async def echo(request, context):
        return request

    async def burst(request, context):  # never waits: its messages are ready at once
        for i in range(3):
            yield bytes([i])

    async def watch(request, context):  # writes with context.write, as Health.Watch does
        await context.write(b"first")
        started.set()
        await asyncio.sleep(60)

    async def chat(requests, context):  # bidi: one answer per message
        async for message in requests:
            yield message.upper()

    return grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Burst": grpc.unary_stream_rpc_method_handler(burst),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
        },
    )


class Rig:
    """One Calls under test, its recorder, and what its handlers report."""

    def __init__(self):
        self.recorder, self.cleaned = Recorder(), []
        self.calls = Calls(self.recorder)
        self.started = asyncio.Event()

    @contextlib.asynccontextmanager
    async def channel(self):
        """A real aio server with the Calls interceptor, and a channel to it."""
        server = grpc.aio.server(interceptors=[self.calls])
        server.add_generic_rpc_handlers((_handlers(self.started, self.cleaned),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield channel
        finally:
            await server.stop(None)

    async def seen(self) -> None:
        """Until the watcher has heard of a call's end (a moment after the client)."""
        for _ in range(100):
            if self.recorder.seen:
                return
            await asyncio.sleep(0.02)

    def codes(self) -> dict:
        return {method: (responses, code) for method, responses, code in self.recorder.seen}


async def _outcome(call, timeout: float = 5):
    """None when `call` (an awaitable) ends well, else the status it ended with."""
    try:
        await asyncio.wait_for(call, timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return None


async def _collect(stream, into: list) -> None:
    """Read a stream's messages into `into` (kept when the stream then fails)."""
    async for message in stream:
        into.append(message)


def test_watchers_see_responses_and_codes_and_end_stops_live_calls():
    rig = Rig()

    async def run():
        async with rig.channel() as channel:
            assert await channel.unary_unary("/t.T/Echo")(b"hi", timeout=5) == b"hi"
            slow = channel.unary_unary("/t.T/Slow")(b"", timeout=30)
            await asyncio.wait_for(rig.started.wait(), 5)
            rig.started.clear()
            ticks = channel.unary_stream("/t.T/Ticks")(b"", timeout=30)
            received = []
            reader = asyncio.ensure_future(_collect(ticks, received))
            await asyncio.wait_for(rig.started.wait(), 5)
            assert rig.calls.end(REASON) == 2  # the slow unary call and the stream
            outcomes = [await _outcome(call) for call in (slow, reader)]
        return outcomes, received

    outcomes, received = asyncio.run(run())
    assert outcomes == [(grpc.StatusCode.UNAVAILABLE, REASON)] * 2
    assert len(received) >= 3  # the stream's messages so far were delivered
    assert sorted(rig.cleaned) == ["slow", "ticks"]  # both handlers were cancelled, not left
    codes = rig.codes()
    assert codes["/t.T/Echo"] == ([b"hi"], "OK")
    assert codes["/t.T/Slow"] == ([], "UNAVAILABLE")
    assert codes["/t.T/Ticks"][1] == "UNAVAILABLE"
    assert codes["/t.T/Ticks"][0] == received


def test_a_clients_cancel_is_not_taken_for_the_shutdown():
    rig = Rig()

    async def run():
        async with rig.channel() as channel:
            slow = channel.unary_unary("/t.T/Slow")(b"", timeout=30)
            await asyncio.wait_for(rig.started.wait(), 5)
            slow.cancel()
            await rig.seen()

    asyncio.run(run())
    assert rig.recorder.seen == [("/t.T/Slow", [], "CANCELLED")]
    assert rig.cleaned == ["slow"] and rig.calls.reason is None


def test_deadlines_are_told_apart_from_cancels():
    rig = Rig()

    async def run():
        async with rig.channel() as channel:
            outcome = await _outcome(channel.unary_unary("/t.T/Slow")(b"", timeout=0.3))
            assert outcome[0] == grpc.StatusCode.DEADLINE_EXCEEDED
            await rig.seen()

    asyncio.run(run())
    assert rig.recorder.seen == [("/t.T/Slow", [], "DEADLINE_EXCEEDED")]


def test_write_style_and_bidi_streams_pass_through_and_end():
    """A handler that sends with context.write (gRPC's Health.Watch) is a coroutine, not
    an async generator: it streams through the wrapper and ends on end(); a bidi call's
    watchers see its answers (and no request: its messages are the handler's)."""
    rig = Rig()

    async def run():
        async with rig.channel() as channel:
            chat = channel.stream_stream("/t.T/Chat")(iter([b"a", b"b"]), timeout=10)
            answers = [m async for m in chat]
            watch = channel.unary_stream("/t.T/Watch")(b"", timeout=30)
            first = await watch.read()
            await asyncio.wait_for(rig.started.wait(), 5)
            assert rig.calls.end(REASON) == 1
            return answers, first, await _outcome(watch.read())

    answers, first, outcome = asyncio.run(run())
    assert answers == [b"A", b"B"] and first == b"first"
    assert outcome == (grpc.StatusCode.UNAVAILABLE, REASON)
    codes = rig.codes()
    assert codes["/t.T/Chat"] == ([b"A", b"B"], "OK")
    assert codes["/t.T/Watch"] == ([], "UNAVAILABLE")


def test_after_end_a_stream_with_its_messages_ready_finishes_and_one_that_waits_ends():
    """end() cuts a stream at its next wait, not at a message already at hand: a stream
    whose handler is done gets its end (OK), not UNAVAILABLE."""
    rig = Rig()

    async def run():
        async with rig.channel() as channel:
            rig.calls.end(REASON)  # from now on, every call is past the grace period
            burst = [m async for m in channel.unary_stream("/t.T/Burst")(b"", timeout=10)]
            ticks = channel.unary_stream("/t.T/Ticks")(b"", timeout=10)
            received = []
            return burst, received, await _outcome(_collect(ticks, received), timeout=10)

    burst, received, outcome = asyncio.run(run())
    assert burst == [b"\x00", b"\x01", b"\x02"]
    assert received == [b"\x00"]  # its first message was ready; then it waited
    assert outcome == (grpc.StatusCode.UNAVAILABLE, REASON) and rig.cleaned == ["ticks"]
    codes = {method: code for method, (_, code) in rig.codes().items()}
    assert codes == {"/t.T/Burst": "OK", "/t.T/Ticks": "UNAVAILABLE"}
