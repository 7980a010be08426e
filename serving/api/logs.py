"""Logs: one line per request, plain text or JSON lines (`--log-format`).

`configure(fmt)` sets the root logger's formatter, so every line the server writes
(startup, shutdown, errors, requests) comes in one format. `RequestLog` watches every
RPC (through `serving.api.calls.Calls`) and writes one line per RPC to the
`serving.requests` logger once the RPC ends (`--no-request-log` turns it off):

    request_id  the client's `x-request-id` metadata, or a new uuid4 hex when absent or
                unfit (over 128 characters, or anything but visible ASCII: never
                written raw); returned in the trailing metadata `x-request-id`
    rpc, code   the method (`stepwise.v1.Inference/Generate`) and its status code
    model       the request's `model`, `model_name` or (KServe's ModelReady, metadata,
                config, statistics) `name`; unary requests only: a client-streaming RPC
                such as ModelStreamInfer is one line without it
    duration_ms from the RPC's arrival to its status (a stream: after its last message)
    messages    responses sent (streams only)
    finish_reason, prompt_tokens, completion_tokens, queue_time_us
                where the last response carries them (Generate, Caption)
    peer        the client's address

gRPC health checks are not logged per request: probes every few seconds per load
balancer would bury the traffic.
"""

from __future__ import annotations

import logging
import time
import uuid

from serving.api.calls import RpcWatch

REQUEST_ID = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
MAX_MODEL_CHARS = 128  # a client names the model: bounded before it is logged
QUIET_METHODS = ("/grpc.health.v1.Health/",)
# From the last response of a stream, when it has them (set on the last message only).
RESULT_FIELDS = ("finish_reason", "prompt_tokens", "completion_tokens", "queue_time_us")

log = logging.getLogger("serving.requests")


def request_id(metadata) -> str:
    """The client's `x-request-id` when fit to log and return, else a new uuid4 hex."""
    given = next((v for k, v in metadata or () if k == REQUEST_ID), None)
    if isinstance(given, str) and 0 < len(given) <= MAX_REQUEST_ID_CHARS:
        if all("!" <= c <= "~" for c in given):  # visible ASCII, no spaces
            return given
    return uuid.uuid4().hex


def request_model(request) -> str | None:
    """The model a request names, bounded; None when none."""
    for name in ("model", "model_name", "name"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value[:MAX_MODEL_CHARS]
    return None


class RequestLog:
    """One log line per RPC (health checks aside), and its request id in the trailing
    metadata: a watcher of `serving.api.calls.Calls`, the first interceptor, so refused
    calls (a missing token) are logged too."""

    def __init__(self, logger: logging.Logger = log):
        self.log = logger

    def starter(self, details, handler):
        """What `Calls` calls as each RPC begins (None: this RPC is not logged)."""
        if details.method.startswith(QUIET_METHODS):
            return None
        rpc = details.method.lstrip("/")
        rid = request_id(details.invocation_metadata)

        def start(request, context):
            context.set_trailing_metadata(((REQUEST_ID, rid),))
            return _Logged(self.log, rid, rpc, request, context, handler.response_streaming)

        return start


class _Logged(RpcWatch):
    def __init__(self, logger, rid: str, rpc: str, request, context, streaming: bool):
        self.log, self.start = logger, time.perf_counter()
        self.fields = {"request_id": rid, "rpc": rpc}
        model = request_model(request)
        if model is not None:
            self.fields["model"] = model
        self.peer = context.peer()
        self.streaming, self.messages, self.last = streaming, 0, None

    def response(self, message) -> None:
        self.messages += 1
        self.last = message

    def done(self, code: str) -> None:
        fields = self.fields
        fields["code"] = code
        fields["duration_ms"] = round((time.perf_counter() - self.start) * 1e3, 3)
        if self.streaming:
            fields["messages"] = self.messages
        if getattr(self.last, "finish_reason", ""):  # a stream's last message says these
            for name in RESULT_FIELDS:
                if name in type(self.last).DESCRIPTOR.fields_by_name:
                    fields[name] = getattr(self.last, name)
        fields["peer"] = self.peer
        self.log.info("request", extra={"fields": fields})
