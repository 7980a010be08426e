"""Every RPC through one handler wrapper (`Calls`, the first interceptor).

The wrapper does two jobs that used to be two interceptors, because each layer of
wrapping costs every streamed message an await:
- watchers (the request log, the RPC metrics) see each response and the final status
  code of every call;
- a shutdown can end the calls still running with a status of its own
  (`end(reason)`: UNAVAILABLE and `reason`) shortly before gRPC would cancel them all
  with its "Cancelling all calls".

A watcher has `starter(details, handler)`, returning None (not interested in this
RPC) or `start(request, context) -> RpcWatch`, called as the RPC begins (`request` is
None for a client-streaming RPC: its messages are the handler's to read).
"""

from __future__ import annotations

import asyncio
import inspect

import grpc


class RpcWatch:
    """What a watcher sees of one RPC: each response sent, then its final status code
    (once). Subclasses override what they need."""

    def response(self, message) -> None:
        pass

    def done(self, code: str) -> None:
        pass


class Calls(grpc.aio.ServerInterceptor):
    """Watches every call and knows the ones running, so that a shutdown can end them.

    `end(reason)` ends a unary call still waiting on its handler at once, and a stream
    waiting for its handler's next message at once (its handler cancelled, its
    resources freed as on a client's cancel); a stream whose client has not taken the
    last message yet ends when it does. Messages already sent stay sent."""

    def __init__(self, *watchers):
        self.watchers = watchers
        self.reason: str | None = None
        self._live: dict[asyncio.Task, str] = {}  # each live call's task: its method
        self._waiting: set[asyncio.Task] = set()  # live and awaiting their handler
        self._ended: dict[asyncio.Task, str] = {}  # calls ended one by one: the reason

    def end(self, reason: str) -> int:
        """End every live call with UNAVAILABLE and `reason` (on the event loop's
        thread); the number of calls live."""
        self.reason = reason
        for task in list(self._waiting):
            task.cancel()
        return len(self._live)

    def end_method(self, method: str, reason: str) -> int:
        """End the live calls of one `method` (such as gRPC's health Watch, whose streams
        never end on their own) as `end` does; the number ended."""
        tasks = [task for task, m in self._live.items() if m == method]
        for task in tasks:
            self._ended[task] = reason
            if task in self._waiting:
                task.cancel()
        return len(tasks)

    def _reason(self, task: asyncio.Task) -> str | None:
        return self._ended.get(task, self.reason)

    def _forget(self, task: asyncio.Task) -> None:
        self._live.pop(task, None)
        self._waiting.discard(task)
        self._ended.pop(task, None)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        starts = [s for w in self.watchers if (s := w.starter(details, handler)) is not None]
        if len(starts) == 1:
            begin = starts[0]
        else:

            def begin(request, context):
                return _All([s(request, context) for s in starts])

        if handler.response_streaming:
            inner = handler.unary_stream or handler.stream_stream
            if not inspect.isasyncgenfunction(inner):  # writes with context.write (Health.Watch)
                return self._unary(details.method, handler, begin, streaming=True)
            return self._streaming(details.method, handler, begin)
        return self._unary(details.method, handler, begin)

    def _unary(self, method, handler, begin, streaming: bool = False) -> grpc.RpcMethodHandler:
        inner = (
            handler.unary_unary
            or handler.stream_unary
            or handler.unary_stream
            or handler.stream_stream
        )
        client_streaming = handler.request_streaming

        async def unary(request, context):
            watch, code = begin(None if client_streaming else request, context), "UNKNOWN"
            task = asyncio.current_task()
            self._live[task] = method
            self._waiting.add(task)
            try:
                try:
                    # handed over, not held: a failed call's traceback keeps this frame
                    # alive until a garbage collection (serving.api.status.unary)
                    args, request = [request], None
                    response = await inner(args.pop(), context)
                except asyncio.CancelledError:
                    reason = self._reason(task)
                    if reason is None or _code(context, None) is not None:
                        raise  # the client's cancel, or the handler's status already sent
                    task.uncancel()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
                finally:
                    self._forget(task)
                if not streaming:  # a context.write handler's messages go unseen
                    watch.response(response)
                code = _code(context, "OK")
                return response
            except BaseException as exc:
                code = _code(context, _code_of(exc, context))
                raise
            finally:
                watch.done(code)

        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[bool(client_streaming), streaming]
        return kind(unary, handler.request_deserializer, handler.response_serializer)

    def _streaming(self, method, handler, begin) -> grpc.RpcMethodHandler:
        inner = handler.unary_stream or handler.stream_stream
        client_streaming = handler.stream_stream is not None

        async def streaming(request, context):
            watch, code = begin(None if client_streaming else request, context), "UNKNOWN"
            task, responses = asyncio.current_task(), inner(request, context)
            loop = asyncio.get_running_loop()
            self._live[task] = method
            try:
                ended = None  # the reason it was ended with
                try:
                    while True:
                        self._waiting.add(task)
                        # After end(): let a handler that has its next message (or its
                        # end) ready give it; cancel it at its first wait.
                        late = None if self._reason(task) is None else loop.call_soon(task.cancel)
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                        finally:
                            self._waiting.discard(task)
                            if late is not None:
                                late.cancel()
                        watch.response(response)
                        yield response
                except asyncio.CancelledError:
                    ended = self._reason(task)
                    if ended is None or _code(context, None) is not None:
                        raise  # the client's cancel, or the handler's status already sent
                    task.uncancel()
                finally:
                    self._forget(task)
                    await responses.aclose()  # a no-op once it ended; else its cleanup runs now
                if ended is not None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, ended)
                code = _code(context, "OK")
            except BaseException as exc:
                code = _code(context, _code_of(exc, context))
                raise
            finally:
                watch.done(code)

        kind = (
            grpc.stream_stream_rpc_method_handler
            if client_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        return kind(streaming, handler.request_deserializer, handler.response_serializer)


class _All(RpcWatch):
    def __init__(self, watches: list[RpcWatch]):
        self.watches = watches

    def response(self, message) -> None:
        for watch in self.watches:
            watch.response(message)

    def done(self, code: str) -> None:
        for watch in self.watches:
            watch.done(code)


def _code(context, default: str) -> str:
    """The status the handler set (context.abort / set_code), else `default`."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpcio: no code() on aio contexts
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some versions hand back the enum's integer value
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default)
    return default


# A call cancelled this close to its deadline ran out of time (the client's own cancel
# at its deadline can arrive a few milliseconds before the server's timer fires).
DEADLINE_SLACK_S = 0.05


def _code_of(exc: BaseException, context=None) -> str:
    """The code of a call that ended with `exc` and no status of its own. GeneratorExit:
    the transport closed a stream before its end (its client went away while a message
    was being sent)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining < DEADLINE_SLACK_S:
            return "DEADLINE_EXCEEDED"
        return "CANCELLED"
    return "UNKNOWN"
