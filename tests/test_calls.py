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

    return grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
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
