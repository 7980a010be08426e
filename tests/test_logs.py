"""Structured logs: one line per request with its request id (the client's, or a new
one, returned in the trailing metadata), model, RPC, status, stream results, duration
and peer; text or JSON lines, the server's other lines in the same format."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from test_cli import start_server

from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.api.logs import request_id
from serving.app import create_server
from serving.logformat import JsonFormatter, TextFormatter

HEX32 = r"^[0-9a-f]{32}$"


@pytest.fixture(scope="module")
def served(repository):
    server, port = create_server(loopback_config(repository))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


@pytest.fixture()
def lines(caplog):
    """The request log's records as {field: value}, in order."""
    caplog.set_level(logging.INFO, logger="serving.requests")

    def read(count: int = 1) -> list[dict]:  # a line may follow the status by a moment
        deadline = time.monotonic() + 5
        while True:
            found = [r.fields for r in caplog.records if r.name == "serving.requests"]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.01)

    return read


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), 0).save(buf, "PNG")
    return buf.getvalue()


def _trailing_id(call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


def test_unary_request_logged_with_the_clients_request_id(served, lines):
    stub = pb_grpc.InferenceStub(served)
    request = pb.ClassifyRequest(model="lenet5", image=_png())
    _, call = stub.Classify.with_call(request, metadata=[("x-request-id", "req-42")], timeout=30)
    assert _trailing_id(call) == "req-42"
    (line,) = lines()
    assert line["request_id"] == "req-42" and line["model"] == "lenet5"
    assert line["rpc"] == "stepwise.v1.Inference/Classify" and line["code"] == "OK"
    assert 0 < line["duration_ms"] < 30_000 and line["peer"].startswith("ipv4:127.0.0.1:")
    assert "messages" not in line and "completion_tokens" not in line


def test_stream_logged_with_its_tokens_and_queue_time(served, lines):
    stub = pb_grpc.InferenceStub(served)
    request = pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=12, seed=3)
    call = stub.Generate(request, timeout=30)
    responses = list(call)
    rid = _trailing_id(call)
    assert len(rid) == 32 and int(rid, 16) >= 0  # none given: a new uuid4 hex
    (line,) = lines()
    last = responses[-1]
    assert line["request_id"] == rid and line["model"] == "char_lstm" and line["code"] == "OK"
    assert line["messages"] == len(responses)
    assert line["completion_tokens"] == last.completion_tokens == 12
    assert line["prompt_tokens"] == last.prompt_tokens == 6
    assert line["queue_time_us"] == last.queue_time_us and line["finish_reason"] == "length"


def test_request_id_parser_refuses_what_clients_cannot_send():
    for given in ("bad\nid", "tab\there", "caf\u00e9", "nul\x00"):  # clients refuse to send these
        rid = request_id([("x-request-id", given)])
        assert len(rid) == 32 and int(rid, 16) >= 0


@pytest.mark.parametrize("given", ["x" * 129, "has space", ""])
def test_unfit_request_ids_are_replaced_never_echoed(served, lines, given):
    stub = pb_grpc.InferenceStub(served)
    metadata = [("x-request-id", given)]
    with pytest.raises(grpc.RpcError) as error:
        stub.Classify(pb.ClassifyRequest(model="nope\n"), metadata=metadata, timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    rid = _trailing_id(error.value)
    assert len(rid) == 32 and rid != given
    (line,) = lines()
    assert line["request_id"] == rid and line["code"] == "NOT_FOUND"
    record = logging.LogRecord("serving.requests", logging.INFO, "", 0, "request", (), None)
    record.fields = line
    text = TextFormatter().format(record)
    assert "\n" not in text and 'model="nope\\n"' in text  # quoted, escaped
    assert not given or given not in text


def test_health_checks_are_not_logged_and_kserve_calls_are(served, lines):
    health = health_pb2_grpc.HealthStub(served)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    kserve = kpb_grpc.GRPCInferenceServiceStub(served)
    assert kserve.ServerLive(kpb.ServerLiveRequest(), timeout=5).live
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="lenet5"), timeout=5).ready
    list(kserve.ModelStreamInfer(iter(()), timeout=10))  # client streaming: no model
    rpcs = [(line["rpc"], line.get("model")) for line in lines(3)]
    assert rpcs == [
        ("inference.GRPCInferenceService/ServerLive", None),
        ("inference.GRPCInferenceService/ModelReady", "lenet5"),
        ("inference.GRPCInferenceService/ModelStreamInfer", None),
    ]


def test_formatters():
    record = logging.LogRecord("serving.requests", logging.INFO, "", 0, "request", (), None)
    record.fields = {"request_id": "a=b", "rpc": "x/Y", "duration_ms": 1.23456, "n": 3}
    text = TextFormatter().format(record)
    assert text.endswith('serving.requests: request request_id="a=b" rpc=x/Y duration_ms=1.235 n=3')
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request" and entry["level"] == "INFO"
    assert entry["request_id"] == "a=b" and entry["duration_ms"] == 1.23456
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("serving", logging.ERROR, "", 0, "x %d", (1,), sys.exc_info())
    entry = json.loads(JsonFormatter().format(failed))
    assert entry["message"] == "x 1" and "ValueError: boom" in entry["exception"]
    assert request_id([("x-request-id", "ok-1")]) == "ok-1"
    assert request_id([("other", "v")]) != request_id(None)  # new ones each time


def test_json_log_format_applies_to_every_line(repository):
    proc, target = start_server(repository, "--log-format", "json", "--drain-delay", "0")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            metadata = [("x-request-id", "json-1")]
            stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    entries = [json.loads(line) for line in proc.stdout.read().splitlines()]
    messages = [e["message"] for e in entries]
    assert any(m.startswith("serving 3 model(s) on 127.0.0.1:") for m in messages)
    assert any(m.startswith("stopped after") for m in messages)
    (request,) = [e for e in entries if e["logger"] == "serving.requests"]
    assert request["request_id"] == "json-1" and request["code"] == "OK"
    assert request["rpc"] == "stepwise.v1.Inference/ListModels" and "model" not in request


def test_no_request_log_writes_no_request_lines_and_still_counts(repository, caplog):
    caplog.set_level(logging.INFO, logger="serving.requests")
    server, port = create_server(loopback_config(repository, request_log=False, metrics_port=None))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.Classify(pb.ClassifyRequest(model="lenet5", image=_png()), timeout=30)
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
    finally:
        server.stop(None).wait(30)
    assert not [r for r in caplog.records if r.name == "serving.requests"]
    counted = server.metrics.requests.labels("stepwise.v1.Inference/Classify", "OK")
    assert counted._value.get() == 1  # the metrics watcher still sees every call
