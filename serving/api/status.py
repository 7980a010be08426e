"""One status mapping and one pair of handler decorators for both protocols.

`serving.errors` names a neutral status code per error class; here, and only here, it
becomes a gRPC status with a bounded message. `unary` and `streaming` wrap every
handler of `stepwise.v1.Inference` and `inference.GRPCInferenceService`: whatever a
handler raises becomes its status, and an unexpected error becomes INTERNAL (logged)
while the server carries on. `add_to_server` registers a servicer so that requests
that do not parse reach the handler (and become INVALID_ARGUMENT, not INTERNAL).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import grpc

from serving.errors import InvalidArgument, ServingError

log = logging.getLogger(__name__)

# The status message travels percent-encoded in a header (up to 3 bytes per byte):
# 1 KiB stays far below every client's metadata limit, so the status is always ours.
MAX_STATUS_MESSAGE_BYTES = 1024


def status_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """The message cut to `limit` UTF-8 bytes at a character boundary, marked when cut."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    cut = data[: limit - 40].decode("utf-8", "ignore")
    return f"{cut}... ({len(data) - len(cut.encode())} more bytes)"


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message an exception becomes (logged when INTERNAL)."""
    if isinstance(exc, ServingError):
        if exc.code == "INTERNAL":
            log.error("%s: %s", type(exc).__name__, exc)
        return grpc.StatusCode[exc.code], status_message(str(exc))
    log.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


@dataclass(frozen=True)
class Undecodable:
    """Request bytes that are not the method's message (bad wire format, invalid UTF-8
    in a string): handed to the handler, which answers INVALID_ARGUMENT, where grpcio's
    own deserializer failure would answer INTERNAL."""

    message: str  # the expected message's full name
    error: str

    def check(self) -> None:
        raise InvalidArgument("request", f"cannot parse as {self.message} ({self.error})")


def _lenient_parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or worse, from the parser
            return Undecodable(message_cls.DESCRIPTOR.full_name, type(exc).__name__)

    return parse


def add_to_server(servicer, server, module, service_name: str) -> None:
    """`add_<Service>Servicer_to_server`, but requests that fail to parse reach the
    handler as `Undecodable` (and become INVALID_ARGUMENT) instead of INTERNAL.
    `module` is the generated `_pb2` module that defines the service."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    makers = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        make = makers[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(getattr(module, method.input_type.name)),
            response_serializer=getattr(module, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def unary(handler):
    """An async unary handler whose errors become their status codes."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            if isinstance(request, Undecodable):
                request.check()
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(exc)
        # The abort's traceback keeps this frame alive until a garbage collection breaks
        # its cycle: a refused request (up to --max-message-bytes) must not live on in it.
        request = None  # noqa: F841
        await context.abort(code, message)

    return wrapper


def streaming(handler):
    """An async streaming handler whose errors become their status codes."""

    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            if isinstance(request, Undecodable):
                request.check()
            async for response in handler(self, request, context):
                yield response
            return
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(exc)
        await context.abort(code, message)

    return wrapper


# An asyncio server cannot reset one HTTP/2 stream, and a status queues behind the
# messages the client has not taken: the stalled stream's slot and batch row are freed
# at once, and the client gets this status as soon as it reads again.
STALLED = "the client took no message for too long; the stream was cancelled"
