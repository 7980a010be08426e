"""The server over a real channel: every RPC, every documented error, health, reflection."""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from polling import eventually

from bench.harness import loopback_config
from serving._proto.stepwise.v1 import inference_pb2 as pb
from training.data.digits import digit_to_image, load_digits_split


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def held_out():
    _, _, _, y_test, pixels = load_digits_split()
    return pixels, y_test


def assert_serves(client) -> None:
    """The server still answers after an error."""
    assert [m.name for m in client.list_models()] == ["char_lstm", "char_lstm_prefill", "lenet5"]


def test_list_models_describes_every_model(client):
    models = {m.name: m for m in client.list_models()}
    lenet, lm = models["lenet5"], models["char_lstm"]
    assert (lenet.kind, lenet.version, lenet.execution_provider) == (
        "classifier",
        "1",
        "CPUExecutionProvider",
    )
    assert [(t.name, t.dtype, list(t.shape)) for t in lenet.inputs] == [
        ("input", "float32", [-1, 1, 32, 32])
    ]
    assert list(lenet.labels) == [str(i) for i in range(10)]
    assert float(lenet.metadata["test_accuracy"]) > 0.5
    assert lm.kind == "language_model"
    assert [t.name for t in lm.inputs] == ["tokens", "h", "c"]
    assert [t.name for t in lm.outputs] == ["logits", "h_next", "c_next"]
    assert "val_loss_nats_per_char" in lm.metadata


@pytest.mark.parametrize("size,mode", [(8, "L"), (20, "RGB"), (57, "RGBA"), (128, "L")])
def test_classify_png_of_any_size_and_mode(client, held_out, size, mode):
    pixels, labels = held_out
    n, correct = 60, 0
    for i in range(n):
        image = digit_to_image(pixels[i]).resize((size, size), Image.BILINEAR).convert(mode)
        response = client.classify(png(image), top_k=3)
        assert len(response.classes) == 3
        probs = [c.probability for c in response.classes]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        correct += response.classes[0].label == str(labels[i])
    assert correct / n >= 0.85  # a 4-epoch fixture model; the full model is measured in docs


def test_classify_tensor_matches_image(client, repository, held_out):
    from serving.core.models import load_model
    from serving.core.preprocess import ImageDecoder

    model = load_model(repository / "lenet5" / "1", "cpu")
    data = png(digit_to_image(held_out[0][0]))
    x = ImageDecoder().tensor(data, model.preprocess)
    tensor = pb.Tensor(dtype="float32", shape=[1, *x.shape], raw_data=x.astype("<f4").tobytes())
    by_tensor = client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor, top_k=10))
    by_image = client.classify(data, top_k=10)
    assert [c.index for c in by_tensor.classes] == [c.index for c in by_image.classes]
    np.testing.assert_allclose(
        [c.probability for c in by_tensor.classes],
        [c.probability for c in by_image.classes],
        rtol=1e-6,
    )


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.ClassifyResponse):
            list(result)  # drain a stream
    return info.value


BAD_CLASSIFY = [
    (dict(model="nope", image=b"x"), grpc.StatusCode.NOT_FOUND, "model"),
    (dict(model="", image=b"x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (dict(model="char_lstm", image=b"x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    (dict(model="lenet5", image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    (dict(model="lenet5"), grpc.StatusCode.INVALID_ARGUMENT, "input"),
    (
        dict(
            model="lenet5",
            tensor=pb.Tensor(dtype="float32", shape=[1, 28, 28], raw_data=bytes(4 * 28 * 28)),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor.shape",
    ),
    (
        dict(
            model="lenet5",
            tensor=pb.Tensor(dtype="int64", shape=[1, 32, 32], raw_data=bytes(8 * 32 * 32)),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor.dtype",
    ),
    (
        dict(
            model="lenet5", tensor=pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(7))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor.raw_data",
    ),
    (
        dict(model="lenet5", image=b"\x89PNG\r\n\x1a\n" + bytes(40), top_k=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image",
    ),
    (
        dict(
            model="lenet5",
            tensor=pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(4 * 32 * 32)),
            top_k=11,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k",
    ),
    (
        dict(
            model="lenet5",
            tensor=pb.Tensor(
                dtype="float32",
                shape=[1, 32, 32],
                raw_data=np.full((1, 32, 32), np.nan, "<f4").tobytes(),
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor.raw_data",
    ),
    (
        dict(model="lenet5", tensor=pb.Tensor(dtype="float32", shape=[-1, 32, 32])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "tensor.shape",
    ),
]


@pytest.mark.parametrize("fields,code,field", BAD_CLASSIFY)
def test_classify_errors_name_the_field(client, fields, code, field):
    err = _error(lambda: client.stub.Classify(pb.ClassifyRequest(**fields)))
    assert err.code() == code
    assert err.details().startswith(field + ":"), err.details()
    assert_serves(client)


BAD_GENERATE = [
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "model", "available"),
    (dict(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens", "1 to 4096"),
    (dict(max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens", "1 to 4096"),
    (dict(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature", "0 (greedy)"),
    (dict(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "temperature", "to 10"),
    (dict(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p", "(0, 1]"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p", "(0, 1]"),
    (dict(top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k", "0 (off)"),
    (dict(top_k=1000), grpc.StatusCode.INVALID_ARGUMENT, "top_k", "0 (off)"),
    (dict(temperature=10.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature", "to 10"),
    (dict(model="lenet5"), grpc.StatusCode.INVALID_ARGUMENT, "model", "language_model"),
    (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model", "required"),
    (dict(prompt="KING ☃ §"), grpc.StatusCode.INVALID_ARGUMENT, "prompt", "allowed: "),
    (dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]", "1 to 64"),
    (dict(stop=["a"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "stop", "at most 8"),
    (dict(prompt="KING " * 4000), grpc.StatusCode.INVALID_ARGUMENT, "prompt", "at most 16384"),
    (dict(repetition_penalty=0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty", "(0, 10]"),
    (dict(repetition_penalty=11), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty", "1 for"),
    (dict(max_tokens=5, min_tokens=6), grpc.StatusCode.INVALID_ARGUMENT, "min_tokens", "(5)"),
    (dict(min_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT, "min_tokens", "0 to max_tokens"),
    (dict(logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs", "0 to 20"),
    (dict(logprobs=-1), grpc.StatusCode.INVALID_ARGUMENT, "logprobs", "0 to 20"),
]


@pytest.mark.parametrize("fields,code,field,allowed", BAD_GENERATE)
def test_generate_errors_name_the_field_and_allowed_values(client, fields, code, field, allowed):
    request = pb.GenerateRequest(**{"model": "char_lstm", "prompt": "KING", **fields})
    err = _error(lambda: client.stub.Generate(request))
    assert err.code() == code
    assert err.details().startswith(field + ":") and allowed in err.details(), err.details()
    if "☃" in request.prompt:  # the message names the offending characters
        assert "☃" in err.details() and "§" in err.details()
    assert_serves(client)


def _generate(client, **options) -> tuple[str, pb.GenerateResponse]:
    responses = list(client.generate_stream(**{"model": "char_lstm", **options}))
    assert all(not r.finish_reason for r in responses[:-1])
    return "".join(r.text for r in responses), responses[-1]


def test_same_seed_same_text(client):
    a, last = _generate(client, prompt="KING.\n", max_tokens=150, temperature=0.8, seed=7)
    b, _ = _generate(client, prompt="KING.\n", max_tokens=150, temperature=0.8, seed=7)
    c, _ = _generate(client, prompt="KING.\n", max_tokens=150, temperature=0.8, seed=8)
    assert a == b and a != c
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 6, 150)
    assert len(a) == 150


def test_unseeded_generation_reports_its_seed_and_repeats_with_it(client):
    a, last = _generate(client, prompt="KING.\n", max_tokens=80)
    b, again = _generate(client, prompt="KING.\n", max_tokens=80, seed=last.seed)
    assert a == b and again.seed == last.seed
    _, other = _generate(client, prompt="KING.\n", max_tokens=80)
    assert other.seed != last.seed


def test_greedy_generation_learned_the_play(client):
    text, last = _generate(client, prompt="KING.\nNow is the ", max_tokens=40, temperature=0)
    assert text.startswith("winter"), text  # the fixture corpus says so
    assert last.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_sent(client):
    full, _ = _generate(client, prompt="QUEEN.\n", max_tokens=60, temperature=0)
    stop = full[10:13]
    text, last = _generate(client, prompt="QUEEN.\n", max_tokens=60, temperature=0, stop=[stop])
    assert last.finish_reason == "stop"
    assert text == full[: full.find(stop)] and stop not in text


@pytest.fixture()
def slow_lm(server, monkeypatch):
    """The served char_lstm, slowed to 5 ms a step so a 4000-token request takes 20 s."""
    model = server[0].registry.models["char_lstm"]
    run = model.run

    def slow_run(*args):
        time.sleep(0.005)
        return run(*args)

    monkeypatch.setattr(model, "run", slow_run)
    return model


def graph_runs(server) -> int:
    """char_lstm's graph runs so far, as its engine counts them."""
    stats = server[0].engines["char_lstm"].stats
    return stats.step_runs + stats.prefill_runs


def test_tokens_stream_before_generation_ends(server, client, slow_lm):
    start = graph_runs(server)
    stream = client.generate_stream(
        prompt="KING.\n", model="char_lstm", max_tokens=4000, temperature=1.0, seed=1
    )
    first = next(stream)
    steps_at_first = graph_runs(server) - start
    assert first.text and not first.finish_reason
    assert steps_at_first < 100  # the first token arrived long before the 4000th was sampled
    stream.cancel()


def test_coalesced_streaming_sends_the_same_tokens_in_fewer_messages(channel, slow_lm):
    """At 5 ms a step, stream_interval_ms=50 puts about ten tokens in a message, unset
    (the server's default, 20 ms) about four; 0 sends each as it comes. The text, the
    token count and the finish are the same; a value past 1000 is refused, naming the
    field."""
    from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceStub(channel)

    def run(**interval):
        request = pb.GenerateRequest(
            model="char_lstm", prompt="KING.\n", max_tokens=60, min_tokens=60, seed=5, **interval
        )
        return list(stub.Generate(request, timeout=60))

    alone, coalesced = run(stream_interval_ms=0), run(stream_interval_ms=50)
    assert "".join(r.text for r in coalesced) == "".join(r.text for r in alone)
    assert coalesced[-1].completion_tokens == alone[-1].completion_tokens == 60
    assert coalesced[-1].finish_reason == alone[-1].finish_reason == "length"
    assert len(alone) >= 40  # a message per token, or nearly: the client keeps up
    assert len(coalesced) <= 20  # about 60 / 10, the first token alone
    assert len(coalesced[0].text) <= 2  # the first token was not held for company
    assert len(run()) <= 30  # unset: the server's default, 20 ms
    with pytest.raises(grpc.RpcError) as info:
        run(stream_interval_ms=1001)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("stream_interval_ms: got 1001; allowed 0")


def test_cancelled_stream_stops_generating(server, client, slow_lm):
    start = graph_runs(server)
    stream = client.generate_stream(
        prompt="KING.\n", model="char_lstm", max_tokens=4000, temperature=1.0, seed=2
    )
    for _, _ in zip(range(5), stream, strict=False):
        pass
    stream.cancel()
    time.sleep(0.3)  # the server notices at its next step
    settled = graph_runs(server)
    time.sleep(0.3)
    assert graph_runs(server) == settled  # no graph ran after the cancel settled
    assert settled - start < 200  # of 4000 requested


def test_health_reports_serving(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "stepwise.v1.Inference"):
        status = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"stepwise.v1.Inference", "grpc.health.v1.Health"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    method = pool.FindServiceByName("stepwise.v1.Inference").FindMethodByName("Generate")
    assert method.server_streaming and method.output_type.name == "GenerateResponse"


def test_unexpected_failure_is_internal_and_harms_no_other_request(client, server, monkeypatch):
    model = server[0].registry.models["lenet5"]

    def broken(x):
        raise RuntimeError("simulated runtime failure")

    monkeypatch.setattr(model, "probabilities", broken)  # no batcher: what Classify runs
    tensor = pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(4 * 32 * 32))
    err = _error(lambda: client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor)))
    assert err.code() == grpc.StatusCode.INTERNAL and "RuntimeError" in err.details()
    text, last = _generate(client, prompt="KING.\n", max_tokens=5, temperature=0)
    assert len(text) == 5 and last.finish_reason == "length"
    monkeypatch.undo()
    assert client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor)).classes


def test_streams_past_the_cap_wait_then_are_refused_and_health_still_answers(repository):
    from bench.harness import loopback_config
    from serving.app import create_server
    from serving.client import StepwiseClient

    server, port = create_server(
        loopback_config(
            repository, port=0, device="cpu", max_workers=4, max_streams=2, max_waiting_streams=1
        )
    )
    model = server.registry.models["char_lstm"]
    run = model.run
    model.run = lambda *args: (time.sleep(0.005), run(*args))[1]
    server.start()
    try:
        with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as c:
            streams = [c.generate_stream("KING.\n", max_tokens=4000, seed=i) for i in range(2)]
            assert all(next(s).text for s in streams)  # both running
            third = c.generate_stream("KING.\n", max_tokens=5, seed=3)  # waits for a slot
            assert eventually(lambda: server.streams.waiting == 1)
            page = server.metrics.render().decode()
            assert 'stepwise_stream_slots{pool="generate",state="waiting"} 1.0' in page
            assert 'stepwise_stream_slots{pool="generate",state="live"} 2.0' in page
            err = _error(lambda: c.generate_stream("KING.\n", max_tokens=5))  # may not wait
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "all 2 streams are busy and 1 wait" in err.details()
            health = health_pb2_grpc.HealthStub(c.channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert len(c.list_models()) == 3
            streams[0].cancel()  # its slot goes to the one waiting
            assert len("".join(r.text for r in third)) == 5
            assert "".join(c.generate("KING.\n", max_tokens=5, seed=1))
            streams[1].cancel()
    finally:
        server.stop(None)


def test_a_busy_port_is_an_error_not_a_shared_socket(repository, server):
    from serving.app import create_server

    with pytest.raises(OSError, match="cannot listen on 127.0.0.1"):
        create_server(loopback_config(repository, port=server[1], device="cpu"))


def test_logprobs_name_each_sampled_token_and_its_alternatives(client):
    responses = list(
        client.generate_stream("KING.\n", max_tokens=12, temperature=0, logprobs=3, seed=1)
    )
    entries = [lp for r in responses for lp in r.logprobs]
    text = "".join(r.text for r in responses)
    assert len(entries) == responses[-1].completion_tokens == 12
    assert "".join(e.token for e in entries) == text
    for e in entries:
        assert len(e.top) == 3 and e.top[0].id == e.id  # greedy: the most likely one
        assert e.logprob <= 0 and [t.logprob for t in e.top] == sorted(
            [t.logprob for t in e.top], reverse=True
        )
    assert all(not r.logprobs for r in client.generate_stream("KING", max_tokens=3))


def test_the_last_message_reports_queue_time_and_time_to_first_token(client):
    *_, last = client.generate_stream("KING.\n", max_tokens=5, seed=3)
    assert 0 <= last.queue_time_us <= last.time_to_first_token_us < 10_000_000
    assert last.time_to_first_token_us > 0


def test_min_tokens_and_repetition_penalty_change_what_is_sampled(client):
    greedy = dict(max_tokens=40, temperature=0)
    plain, _ = _generate(client, prompt="KING.\n", **greedy)
    penalised, _ = _generate(client, prompt="KING.\n", repetition_penalty=3.0, **greedy)
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))  # seen characters are pushed away
    # min_tokens reaches the engine (whose EOS ban tests/test_engine.py checks).
    from serving.api.stepwise import sampling_params

    request = pb.GenerateRequest(model="char_lstm", max_tokens=30, min_tokens=12)
    assert sampling_params(request, 84)[1].min_tokens == 12


def test_seeded_streams_are_identical_alone_and_batched_together(server, target):
    """16 concurrent streams on 4 connections run in one continuous batch and produce
    byte for byte what each produces alone."""
    from concurrent.futures import ThreadPoolExecutor

    from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

    def run(i: int, channel) -> str:
        request = pb.GenerateRequest(
            model="char_lstm", prompt="KING.\n" * (i % 3 + 1), max_tokens=60,
            temperature=0.9, top_k=20, seed=100 + i,
        )  # fmt: skip
        stream = pb_grpc.InferenceStub(channel).Generate(request, timeout=30)
        return "".join(r.text for r in stream)

    # Four connections of their own (not the process-wide shared subchannel).
    channels = [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    try:
        alone = [run(i, channels[0]) for i in range(16)]
        engine = server[0].engines["char_lstm"]
        shared = lambda: sum(n for size, n in engine.stats.batch_sizes.items() if size >= 4)  # noqa: E731
        before = shared()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda i: run(i, channels[i % 4]), range(16)))
    finally:
        for ch in channels:
            ch.close()
    assert together == alone
    assert shared() > before  # they really shared iterations, four or more at a time


def test_a_deadline_ends_the_stream_and_frees_its_row(client, server, slow_lm):
    engine = server[0].engines["char_lstm"]
    ended = lambda: sum(engine.stats.finish_reasons[r] for r in ("cancelled", "deadline"))  # noqa: E731
    assert eventually(lambda: engine.scheduler.live == 0)  # earlier tests' streams are gone
    before = ended()
    stream = client.stub.Generate(
        pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=4000), timeout=0.5
    )
    err = _error(lambda: list(stream))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert eventually(lambda: engine.scheduler.live == 0)
    assert ended() == before + 1


def test_hundreds_of_streams_hold_no_thread_each_and_health_stays_responsive(repository):
    """200 concurrent Generate streams (an asyncio client, so neither side has a thread
    per stream): all finish with their text, the server's threads stay a handful, and
    health checks and unary calls answer while they run."""
    import asyncio
    import threading

    from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
    from serving.app import create_server

    server, port = create_server(loopback_config(repository, max_streams=256))
    model = server.registry.models["char_lstm"]
    run = model.run
    # 5 ms a step: the 200 streams overlap enough to fill a 64-row batch even on a
    # loaded machine (2 ms once left a clean-clone CI run at 61)
    model.run = lambda *args: (time.sleep(0.005), run(*args))[1]
    server.start()
    threads_before = threading.active_count()
    peak, answered = [0], []

    async def main():
        # Four connections of 50 streams: under HTTP/2's 100 streams per connection.
        channels = [
            grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            )
            for _ in range(4)
        ]
        stubs = [pb_grpc.InferenceStub(ch) for ch in channels]
        stub, health = stubs[0], health_pb2_grpc.HealthStub(channels[0])
        try:

            async def one(i: int) -> str:
                request = pb.GenerateRequest(
                    model="char_lstm", prompt="KING.\n", max_tokens=40, min_tokens=40, seed=i
                )
                stream = stubs[i % 4].Generate(request, timeout=60)
                return "".join([r.text async for r in stream])

            async def probe():
                while len(answered) < 5:
                    peak[0] = max(peak[0], threading.active_count())
                    start = time.monotonic()
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    await stub.ListModels(pb.ListModelsRequest(), timeout=5)
                    answered.append(time.monotonic() - start)
                    await asyncio.sleep(0.05)

            texts = await asyncio.gather(*(one(i) for i in range(200)), probe())
            return texts[:-1]
        finally:
            for ch in channels:
                await ch.close()

    try:
        texts = asyncio.run(main())
    finally:
        server.stop(None)
    assert len(texts) == 200 and all(len(t) == 40 for t in texts)
    assert len(answered) == 5 and max(answered) < 5
    # The pool (16), the loop, the engine and gRPC's own: far below one per stream.
    assert peak[0] - threads_before < 40, (threads_before, peak[0])
    assert max(server.engines["char_lstm"].stats.batch_sizes) == 64  # the batch was full
