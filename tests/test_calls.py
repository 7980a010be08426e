"""serving.calls.Calls, the one wrapper around every RPC, over a real channel: its
watchers see every response and the final code, and `end(reason)` ends the calls
still running, unary and streaming, with UNAVAILABLE and the reason (gRPC's own
server stop would say only "Cancelling all calls")."""

from __future__ import annotations

import asyncio

import grpc

from serving.calls import Calls, RpcWatch

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


async def _serve(calls: Calls, started: asyncio.Event, cleaned: list):
    server = grpc.aio.server(interceptors=[calls])
    server.add_generic_rpc_handlers((_handlers(started, cleaned),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_watchers_see_responses_and_codes_and_end_stops_live_calls():
    recorder, cleaned = Recorder(), []
    calls = Calls(recorder)

    async def run():
        started = asyncio.Event()
        server, port = await _serve(calls, started, cleaned)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/t.T/Echo")(b"hi", timeout=5) == b"hi"
            slow = channel.unary_unary("/t.T/Slow")(b"", timeout=30)
            await asyncio.wait_for(started.wait(), 5)
            started.clear()
            ticks = channel.unary_stream("/t.T/Ticks")(b"", timeout=30)
            received = []

            async def read():
                async for message in ticks:
                    received.append(message)

            reader = asyncio.ensure_future(read())
            await asyncio.wait_for(started.wait(), 5)
            assert calls.end(REASON) == 2  # the slow unary call and the stream
            outcomes = []
            for call in (slow, reader):
                try:
                    await asyncio.wait_for(call, 5)
                    outcomes.append(None)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((exc.code(), exc.details()))
        await server.stop(None)
        return outcomes, received

    outcomes, received = asyncio.run(run())
    assert outcomes == [(grpc.StatusCode.UNAVAILABLE, REASON)] * 2
    assert len(received) >= 3  # the stream's messages so far were delivered
    assert sorted(cleaned) == ["slow", "ticks"]  # both handlers were cancelled, not left
    codes = {method: (responses, code) for method, responses, code in recorder.seen}
    assert codes["/t.T/Echo"] == ([b"hi"], "OK")
    assert codes["/t.T/Slow"] == ([], "UNAVAILABLE")
    assert codes["/t.T/Ticks"][1] == "UNAVAILABLE"
    assert codes["/t.T/Ticks"][0] == received


def test_a_clients_cancel_is_not_taken_for_the_shutdown():
    recorder, cleaned = Recorder(), []
    calls = Calls(recorder)

    async def run():
        started = asyncio.Event()
        server, port = await _serve(calls, started, cleaned)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            slow = channel.unary_unary("/t.T/Slow")(b"", timeout=30)
            await asyncio.wait_for(started.wait(), 5)
            slow.cancel()
            for _ in range(100):
                if recorder.seen:
                    break
                await asyncio.sleep(0.02)
        await server.stop(None)

    asyncio.run(run())
    assert recorder.seen == [("/t.T/Slow", [], "CANCELLED")]
    assert cleaned == ["slow"] and calls.reason is None


def test_deadlines_are_told_apart_from_cancels():
    recorder, cleaned = Recorder(), []

    async def run():
        started = asyncio.Event()
        server, port = await _serve(Calls(recorder), started, cleaned)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await channel.unary_unary("/t.T/Slow")(b"", timeout=0.3)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            for _ in range(100):
                if recorder.seen:
                    break
                await asyncio.sleep(0.02)
        await server.stop(None)

    asyncio.run(run())
    assert recorder.seen == [("/t.T/Slow", [], "DEADLINE_EXCEEDED")]


def test_write_style_and_bidi_streams_pass_through_and_end():
    """A handler that sends with context.write (gRPC's Health.Watch) is a coroutine, not
    an async generator: it streams through the wrapper and ends on end(); a bidi call's
    watchers see its answers (and no request: its messages are the handler's)."""
    recorder, cleaned = Recorder(), []
    calls = Calls(recorder)

    async def run():
        started = asyncio.Event()
        server, port = await _serve(calls, started, cleaned)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            chat = channel.stream_stream("/t.T/Chat")(iter([b"a", b"b"]), timeout=10)
            answers = [m async for m in chat]
            watch = channel.unary_stream("/t.T/Watch")(b"", timeout=30)
            first = await watch.read()
            await asyncio.wait_for(started.wait(), 5)
            assert calls.end(REASON) == 1
            try:
                await asyncio.wait_for(watch.read(), 5)
                outcome = None
            except grpc.aio.AioRpcError as exc:
                outcome = (exc.code(), exc.details())
        await server.stop(None)
        return answers, first, outcome

    answers, first, outcome = asyncio.run(run())
    assert answers == [b"A", b"B"] and first == b"first"
    assert outcome == (grpc.StatusCode.UNAVAILABLE, REASON)
    codes = {method: (responses, code) for method, responses, code in recorder.seen}
    assert codes["/t.T/Chat"] == ([b"A", b"B"], "OK")
    assert codes["/t.T/Watch"] == ([], "UNAVAILABLE")


def test_after_end_a_stream_with_its_messages_ready_finishes_and_one_that_waits_ends():
    """end() cuts a stream at its next wait, not at a message already at hand: a stream
    whose handler is done gets its end (OK), not UNAVAILABLE."""
    recorder, cleaned = Recorder(), []
    calls = Calls(recorder)

    async def run():
        started = asyncio.Event()
        server, port = await _serve(calls, started, cleaned)
        calls.end(REASON)  # from now on, every call is past the grace period
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            burst = [m async for m in channel.unary_stream("/t.T/Burst")(b"", timeout=10)]
            ticks = channel.unary_stream("/t.T/Ticks")(b"", timeout=10)
            received = []
            try:
                async for message in ticks:
                    received.append(message)
                outcome = None
            except grpc.aio.AioRpcError as exc:
                outcome = (exc.code(), exc.details())
        await server.stop(None)
        return burst, received, outcome

    burst, received, outcome = asyncio.run(run())
    assert burst == [b"\x00", b"\x01", b"\x02"]
    assert received == [b"\x00"]  # its first message was ready; then it waited
    assert outcome == (grpc.StatusCode.UNAVAILABLE, REASON) and cleaned == ["ticks"]
    codes = {method: code for method, _, code in recorder.seen}
    assert codes == {"/t.T/Burst": "OK", "/t.T/Ticks": "UNAVAILABLE"}
