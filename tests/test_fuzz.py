"""Fuzzing every RPC with hypothesis against a real server over a real channel.

Random and adversarial ClassifyRequest, GenerateRequest and CaptionRequest messages,
and raw bytes that are not valid protobuf or UTF-8. Properties, for every example:
- the status is one of the documented codes, never INTERNAL or UNKNOWN for a
  client's mistake;
- no response carries NaN (probabilities are finite, in [0, 1], sorted);
- the server answers a normal request afterwards.

CI runs a fixed (derandomized) sample of `STEPWISE_FUZZ_EXAMPLES` (default 60) per
test. `make fuzz` runs 2,500 random examples per test (10,000 requests) and prints a
report: requests tried, status codes by RPC, INTERNAL and NaN counts.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
from collections import Counter

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pngs import GRAY, RGB, write_png

from export.__main__ import export_checkpoint
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.server import ServerConfig, create_server
from training.__main__ import main as train_main

EXAMPLES = int(os.environ.get("STEPWISE_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("STEPWISE_FUZZ_RANDOM") == "1"  # make fuzz: new examples each run
REPORT = os.environ.get("STEPWISE_FUZZ_REPORT")  # a path: write the counts there as JSON
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,  # CI sees the same examples for the same code
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
RESULTS: Counter = Counter()  # (rpc, status name) -> requests
NAN_RESPONSES: Counter = Counter()


@pytest.fixture(scope="module")
def fuzz_target(repository, tmp_path_factory):
    """The session's lenet5 and char_lstm plus a dry-run captioner, served."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(repository, root / "repo")
    checkpoint = root / "captioner.pt"
    assert train_main(["captioner", "--dry-run", "--quiet", "--out", str(checkpoint)]) == 0
    export_checkpoint(checkpoint, root / "repo")
    server, port = create_server(ServerConfig(root / "repo", port=0, device="cpu"))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)
    if REPORT:
        report = {
            "requests": sum(RESULTS.values()),
            "internal": sum(n for (_, code), n in RESULTS.items() if code == "INTERNAL"),
            "nan_responses": sum(NAN_RESPONSES.values()),
            "by_rpc": {f"{rpc} {code}": n for (rpc, code), n in sorted(RESULTS.items())},
        }
        with open(REPORT, "w") as f:
            json.dump(report, f, indent=2)


# --- strategies --------------------------------------------------------------------

text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80)
int32 = st.integers(-(2**31), 2**31 - 1)
floats32 = st.floats(width=32)  # NaN, infinities, subnormals and huge values included


def optional(strategy):
    return st.one_of(st.none(), strategy)


def mostly(valid, adversarial):
    """Three draws in four from the valid range: with several fields per request, whole
    requests are valid often enough that the success paths get fuzzed too."""
    return st.integers(0, 3).flatmap(lambda i: adversarial if i == 0 else valid)


@st.composite
def models(draw, name: str) -> str:
    """Mostly the right model for the RPC; sometimes another kind, none, or any text."""
    choice = draw(st.sampled_from([name] * 8 + ["lenet5", "char_lstm", "captioner", "", "?"]))
    return draw(text) if choice == "?" else choice


@st.composite
def images(draw) -> bytes:
    """Valid PNG/JPEG in many modes, depths and sizes (big enough to be reduced),
    with and without transparency keys, damaged ones, and noise."""
    kind = draw(st.sampled_from(["png", "png", "jpeg", "deep", "damaged", "noise"]))
    if kind == "noise":
        return draw(st.binary(max_size=300))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "deep":  # 16-bit gray or RGB, perhaps with a tRNS key
        color = draw(st.sampled_from([GRAY, RGB]))
        samples = rng.integers(0, 65536, (h, w, 1 if color == GRAY else 3))
        key = draw(st.one_of(st.none(), st.integers(0, 65535)))
        channels = 1 if color == GRAY else 3
        trns = None if key is None else struct.pack(">" + "H" * channels, *[key] * channels)
        return write_png(samples, color, 16, transparency=trns)
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"]))
    if kind == "jpeg" and mode not in ("L", "RGB", "CMYK"):
        mode = "RGB"
    if kind != "jpeg" and mode == "CMYK":
        mode = "RGBA"
    pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
    image = Image.fromarray(pixels, "L").convert(mode)
    extra = {}
    if kind != "jpeg" and mode in ("L", "P", "RGB") and draw(st.booleans()):
        extra["transparency"] = (0, 0, 0) if mode == "RGB" else 0  # a tRNS key
    buf = io.BytesIO()
    if kind == "jpeg":
        image.save(buf, "JPEG", progressive=draw(st.booleans()))
    else:
        image.save(buf, "PNG", **extra)
    data = bytearray(buf.getvalue())
    if kind == "damaged":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def tensors(draw) -> pb.Tensor:
    dtype = draw(mostly(st.just("float32"), st.one_of(st.sampled_from(["int64", ""]), text)))
    if draw(
        mostly(st.just(True), st.just(False))
    ):  # well-formed [1, 32, 32] or [1, 1, 32, 32] of adversarial values
        shape = draw(st.sampled_from([[1, 32, 32], [1, 1, 32, 32]]))
        a, b = draw(floats32), draw(floats32)
        values = np.where(np.arange(1024) % 2, a, b).astype("<f4")
        return pb.Tensor(dtype=dtype, shape=shape, raw_data=values.tobytes())
    shape = draw(
        st.one_of(
            st.lists(st.integers(-2, 40), max_size=6),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=70),
        )
    )
    return pb.Tensor(dtype=dtype, shape=shape, raw_data=draw(st.binary(max_size=5000)))


@st.composite
def classify_requests(draw) -> pb.ClassifyRequest:
    top_k = draw(mostly(st.integers(0, 11), int32))
    request = pb.ClassifyRequest(model=draw(models("lenet5")), top_k=top_k)
    which = draw(st.sampled_from(["image", "image", "tensor", "tensor", "none"]))
    if which == "image":
        request.image = draw(images())
    elif which == "tensor":
        request.tensor.CopyFrom(draw(tensors()))
    return request


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    in_vocabulary = st.text(alphabet="KINGQUEFOLwhatlig .\n", max_size=200)
    prompt = draw(mostly(in_vocabulary, st.one_of(text, st.sampled_from(["", "KING " * 3300]))))
    fields = {
        "model": draw(models("char_lstm")),
        "prompt": prompt,
        "max_tokens": draw(
            optional(mostly(st.integers(-3, 40), st.sampled_from([4096, 4097, -(2**31)])))
        ),
        "temperature": draw(optional(mostly(st.floats(0, 10), floats32))),
        "top_k": draw(mostly(st.integers(0, 100), int32)),
        "top_p": draw(optional(mostly(st.floats(0, 1), floats32))),
        "seed": draw(optional(st.integers(0, 2**64 - 1))),
        "stop": draw(
            mostly(
                st.lists(st.text("KINGe .\n", min_size=1, max_size=4), max_size=3),
                st.lists(text, max_size=10),
            )
        ),
    }
    return pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})


@st.composite
def caption_requests(draw) -> pb.CaptionRequest:
    fields = {
        "model": draw(models("captioner")),
        "image": draw(images()),
        "max_length": draw(optional(mostly(st.integers(0, 65), int32))),
        "temperature": draw(optional(mostly(st.floats(0, 10), floats32))),
        "seed": draw(optional(st.integers(0, 2**64 - 1))),
    }
    return pb.CaptionRequest(**{k: v for k, v in fields.items() if v is not None})


# --- properties --------------------------------------------------------------------

NORMAL = pb.ClassifyRequest(
    model="lenet5", tensor=pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(4096))
)


def _check(channel, rpc: str, call) -> None:
    """Run one call; record its status; assert the properties."""
    try:
        responses = call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        responses, code = [], err.code()
        details = err.details() or ""
        assert len(details.encode()) <= 1024, details[:200]
    RESULTS[(rpc, code.name)] += 1
    assert code in DOCUMENTED, f"{rpc}: {code.name}: {details}"
    for response in responses:
        if isinstance(response, pb.ClassifyResponse):
            probs = [c.probability for c in response.classes]
            if not all(math.isfinite(p) and 0 <= p <= 1 for p in probs):
                NAN_RESPONSES[rpc] += 1
                pytest.fail(f"{rpc}: probabilities {probs}")
            assert probs == sorted(probs, reverse=True)
    stub = pb_grpc.InferenceStub(channel)
    assert stub.Classify(NORMAL, timeout=30).classes  # the server still serves


@FUZZ
@given(request=classify_requests())
def test_fuzz_classify(fuzz_target, request):
    stub = pb_grpc.InferenceStub(fuzz_target)
    _check(fuzz_target, "Classify", lambda: [stub.Classify(request, timeout=30)])


@FUZZ
@given(request=generate_requests())
def test_fuzz_generate(fuzz_target, request):
    stub = pb_grpc.InferenceStub(fuzz_target)
    _check(fuzz_target, "Generate", lambda: list(stub.Generate(request, timeout=60)))


@FUZZ
@given(request=caption_requests())
def test_fuzz_caption(fuzz_target, request):
    stub = pb_grpc.InferenceStub(fuzz_target)
    _check(fuzz_target, "Caption", lambda: list(stub.Caption(request, timeout=60)))


@FUZZ
@given(
    method=st.sampled_from(["ListModels", "Classify", "Generate", "Caption"]),
    data=st.one_of(
        st.binary(max_size=400),
        # Well-formed framing around a string field that is not UTF-8.
        st.binary(min_size=1, max_size=60).map(lambda b: b"\x0a" + bytes([len(b)]) + b),
        st.binary(min_size=1, max_size=60).map(lambda b: b"\x12" + bytes([len(b)]) + b),
    ),
)
def test_fuzz_raw_bytes(fuzz_target, method, data):
    path = f"/stepwise.v1.Inference/{method}"
    if method in ("Generate", "Caption"):
        call = fuzz_target.unary_stream(path)
        _check(fuzz_target, f"{method} (bytes)", lambda: list(call(data, timeout=60)))
    else:
        call = fuzz_target.unary_unary(path)
        _check(fuzz_target, f"{method} (bytes)", lambda: [call(data, timeout=30)])


@pytest.mark.parametrize(
    "method,data",
    [
        ("ListModels", b"\x08"),  # a truncated varint
        ("Classify", b"\x0a\x02\xff\xfe"),  # model: not UTF-8
        ("Generate", b"\x12\x03KI\xff"),  # prompt: not UTF-8
        ("Caption", b"\x0a\x01\x80"),
    ],
)
def test_unparsable_request_is_invalid_argument_naming_the_message(fuzz_target, method, data):
    """grpcio answers INTERNAL "Exception deserializing request!" by itself."""
    path = f"/stepwise.v1.Inference/{method}"
    streaming = method in ("Generate", "Caption")
    call = (fuzz_target.unary_stream if streaming else fuzz_target.unary_unary)(path)
    with pytest.raises(grpc.RpcError) as info:
        list(call(data, timeout=30)) if streaming else call(data, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        f"request: cannot parse as stepwise.v1.{method}Request (DecodeError)"
    )
