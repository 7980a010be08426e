"""Requests a hostile or careless client sends, over a real channel: each once got a
wrong answer or a wrong status (issue 11's reproducers); now each gets the right one
and the server carries on."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image
from pngs import GRAY, write_png

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.api.status import MAX_STATUS_MESSAGE_BYTES, status_message
from serving.engine import EngineStats, run_alone, text_request
from serving.engine.sampler import SamplingParams
from training.data.digits import digit_to_image, load_digits_split


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if not isinstance(result, pb.ClassifyResponse):
            list(result)
    return info.value


def _probabilities(response: pb.ClassifyResponse) -> dict[int, float]:
    return {c.index: c.probability for c in response.classes}


def _assert_serves(client) -> None:
    assert "".join(client.generate("KING.\n", max_tokens=3, seed=1))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_16bit_gray_png_is_classified_like_its_8bit_twin(client):
    """Background 2056/65535 and ink 65535 was clipped to all white (1: 0.487)."""
    digit = np.asarray(digit_to_image(load_digits_split()[4][0]).resize((28, 28)))
    deep = write_png(np.where(digit > 60, 65535, 2056)[..., None], GRAY, 16)
    twin = _png(Image.fromarray(np.where(digit > 60, 255, 8).astype(np.uint8), "L"))
    white = _png(Image.new("L", (28, 28), 255))
    got, want = (_probabilities(client.classify(d, top_k=10)) for d in (deep, twin))
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[i] for i in range(10)], [want[i] for i in range(10)])
    blank = _probabilities(client.classify(white, top_k=10))
    assert max(abs(got[i] - blank[i]) for i in range(10)) > 0.05


@pytest.mark.parametrize("dims", [9, 65, 100])
def test_tensor_with_too_many_dimensions_is_invalid_argument(client, dims):
    tensor = pb.Tensor(dtype="float32", shape=[1] * dims, raw_data=bytes(4))
    err = _error(lambda: client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("tensor.shape:") and "at most 8" in err.details()
    _assert_serves(client)


@pytest.mark.parametrize("value", [3e38, -3e38, 1e30, 1e6, 0.5])
def test_finite_huge_tensor_never_answers_nan(client, value):
    """Every value 3e38 overflowed inside the network and came back OK with NaN."""
    raw = np.full((1, 1, 32, 32), value, "<f4").tobytes()
    tensor = pb.Tensor(dtype="float32", shape=[1, 1, 32, 32], raw_data=raw)
    request = pb.ClassifyRequest(model="lenet5", tensor=tensor, top_k=10)
    try:
        response = client.stub.Classify(request)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith("tensor.raw_data:") and "overflow" in err.details()
        assert abs(value) > 1e6  # only values far outside the trained range
        return
    probs = [c.probability for c in response.classes]
    assert np.all(np.isfinite(probs)) and abs(sum(probs) - 1) < 1e-4
    assert abs(value) < 1e38  # 3e38 must not pass: it overflows lenet5


def test_non_finite_logits_from_an_image_are_internal_never_ok(client, server, monkeypatch):
    model = server[0].registry.models["lenet5"]

    class NaNSession:
        def run(self, names, feeds):
            return [np.full((len(feeds["input"]), 10), np.nan, np.float32)]

    monkeypatch.setattr(model, "session", NaNSession())
    err = _error(lambda: client.classify(_png(Image.new("L", (8, 8))), top_k=3))
    assert err.code() == grpc.StatusCode.INTERNAL and "non-finite" in err.details()
    monkeypatch.undo()
    assert client.classify(_png(Image.new("L", (8, 8))), top_k=3).classes


def test_many_unknown_characters_give_a_short_invalid_argument(client):
    """1,500 distinct out-of-vocabulary characters overflowed the status header and
    came back RESOURCE_EXHAUSTED."""
    prompt = "".join(chr(0x4E00 + i) for i in range(1500))
    err = _error(lambda: client.stub.Generate(pb.GenerateRequest(model="char_lstm", prompt=prompt)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details()
    assert details.startswith("prompt: characters ") and "and 1490 more" in details
    assert len(details.encode()) <= MAX_STATUS_MESSAGE_BYTES
    _assert_serves(client)


def test_status_messages_are_capped_at_a_character_boundary():
    short = "prompt: fine"
    assert status_message(short) == short
    long = "x: " + "☃" * 2000  # 3 bytes each
    capped = status_message(long)
    assert len(capped.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert capped.startswith("x: ☃") and capped.endswith("more bytes)")
    capped.encode("utf-8")  # no half characters


@pytest.mark.parametrize("side", [5000, 20_000, 70_000])  # ours < 89M (Pillow's) < 179M+
def test_pixel_bombs_get_one_clear_message(client, side):
    """Above Pillow's own limit the answer was '(DecompressionBombError)'."""
    data = write_png(np.zeros((1, 1, 1), np.int64), GRAY, 8, size=(side, side))
    err = _error(lambda: client.classify(data))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        f"image: {side}x{side} = {side * side} pixels; at most {4096 * 4096} allowed"
    )
    _assert_serves(client)


def test_long_prompts_are_consumed_in_chunks_with_the_same_result(server):
    model = server[0].registry.models["char_lstm"]
    prompt = "KING.\nNow is the winter of our discontent.\n\nQUEEN.\nGood night, sweet "
    greedy = SamplingParams(temperature=0)

    def run(chunk: int) -> tuple[str, int]:
        original = model.prefill_chunk
        model.prefill_chunk = chunk
        try:
            stats = EngineStats()
            seq = text_request(model, prompt, 30, greedy)
            text = "".join(p for d in run_alone(model, seq, stats=stats) for p in d.pieces)
            return text, stats.step_runs + stats.prefill_runs
        finally:
            model.prefill_chunk = original

    whole, runs_whole = run(10_000)
    chunked, runs_chunked = run(7)
    assert chunked == whole and whole.startswith("prince")
    tokens = len(prompt) + 1  # BOS
    assert runs_chunked - runs_whole == -(-tokens // 7) - 1  # ceil(T / 7) prefill runs, not 1
