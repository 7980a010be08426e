"""Fuzzing every RPC with hypothesis against a real server over a real channel.

Random and adversarial ClassifyRequest, GenerateRequest and CaptionRequest messages;
KServe V2 ModelInferRequest messages for every served model, one per ModelInfer and
several per ModelStreamInfer (whole sequences among them): shapes with zeros and huge
dimensions, right and wrong datatypes, raw and typed contents, BYTES text, token ids
and floats out of range, requested outputs, sequence controls, unknown models and
versions; and raw bytes that are not valid protobuf or UTF-8. Properties, for every
example:
- the status is one of the documented codes, never INTERNAL or UNKNOWN for a
  client's mistake; a stream ends OK, and no request's `error_message` is internal;
- no response carries NaN (probabilities are finite, in [0, 1], sorted; every float
  output tensor is finite);
- the server answers a normal request afterwards (and, after a KServe example, a
  sequence step through the engine).

CI runs a fixed (derandomized) sample of `STEPWISE_FUZZ_EXAMPLES` (default 60) per
test. `make fuzz` runs 2,500 random examples per test (15,000 calls, and the streams'
requests besides) and prints a report: calls tried, status codes by RPC, outcomes of
the streams' requests, INTERNAL and NaN counts.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pngs import GRAY, RGB, write_png

from bench.harness import loopback_config
from export.__main__ import export_checkpoint
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.inference import model_config_pb2 as mc
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.app import create_server
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
STREAM_ANSWERS: Counter = Counter()  # (rpc, outcome) -> requests answered on a stream
NAN_RESPONSES: Counter = Counter()
INTERNAL_MESSAGE = "internal error:"  # status_of's message for an unexpected exception


@pytest.fixture(scope="module")
def fuzz_target(repository, tmp_path_factory):
    """The session's lenet5 and char_lstm plus a dry-run captioner, served."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(repository, root / "repo")
    checkpoint = root / "captioner.pt"
    assert train_main(["captioner", "--dry-run", "--quiet", "--out", str(checkpoint)]) == 0
    export_checkpoint(checkpoint, root / "repo")
    server, port = create_server(loopback_config(root / "repo"))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)
    if REPORT:
        answers = RESULTS + STREAM_ANSWERS
        report = {
            "requests": sum(RESULTS.values()),
            "stream_requests": sum(STREAM_ANSWERS.values()),
            "internal": sum(n for (_, code), n in answers.items() if code == "INTERNAL"),
            "nan_responses": sum(NAN_RESPONSES.values()),
            "by_rpc": {f"{rpc} {code}": n for (rpc, code), n in sorted(RESULTS.items())},
            "stream_answers": {
                f"{rpc} {outcome}": n for (rpc, outcome), n in sorted(STREAM_ANSWERS.items())
            },
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


# Coalescing intervals: short ones that run (a long one would hold every message), or
# any uint32, almost all past the 1000 ms bound and refused.
stream_intervals = optional(mostly(st.integers(0, 30), st.integers(0, 2**32 - 1)))


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
        "stream_interval_ms": draw(stream_intervals),
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
        "stream_interval_ms": draw(stream_intervals),
    }
    return pb.CaptionRequest(**{k: v for k, v in fields.items() if v is not None})


# --- properties --------------------------------------------------------------------

NORMAL = pb.ClassifyRequest(
    model="lenet5", tensor=pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(4096))
)


def _check(channel, rpc: str, call) -> list:
    """Run one call; record its status; assert the properties; return its responses."""
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
        elif isinstance(response, kpb.ModelStreamInferResponse):
            message = response.error_message
            assert not message.startswith(INTERNAL_MESSAGE), f"{rpc}: {message}"
    stub = pb_grpc.InferenceStub(channel)
    assert stub.Classify(NORMAL, timeout=30).classes  # the server still serves
    return responses


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


# --- the KServe V2 surface ----------------------------------------------------------

KSERVE_ROOT = "inference.GRPCInferenceService"
# The datatypes fuzzed as numpy dtypes, and the typed-contents field of each (FP16 has none).
KSERVE_NUMPY = {
    "FP32": "<f4",
    "FP64": "<f8",
    "FP16": "<f2",
    "INT64": "<i8",
    "INT32": "<i4",
    "UINT8": "u1",
    "BOOL": "?",
    "BYTES": object,
}
CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
}
# Past these a tensor is sent with a short payload: the server must refuse it by its
# sizes, and the fuzzer never builds it.
RAW_BUDGET = 1_000_000  # bytes of numbers
BYTES_BUDGET = 4096  # BYTES elements
HUGE = [0, 0, 1, 65, 2**31, 2**62, 2**63 - 1, -1]  # a poked dimension: zero twice as often
# Sequence ids are fresh for each example (its steps meet only each other), so that
# Hypothesis, replaying an example, meets none of the state an earlier one left.
SEQUENCE_IDS = itertools.count(1)
HEALTH_IDS = itertools.count(1)


@dataclass(frozen=True)
class Served:
    """One served model as the server describes it: every input of its graph (a step
    model's implicit state too) as (name, datatype, shape with -1 for any), the inputs
    its metadata lists, its graph's outputs, whether it takes sequence controls and a
    sequence step's `text`, and its vocabulary size (0: no `tokens` input)."""

    name: str
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]
    listed: tuple[str, ...]
    outputs: tuple[str, ...]
    sequence: bool
    text: bool
    vocab: int


def _sequence_step(name: str, key: str, tensor: str, data: bytes) -> kpb.ModelInferRequest:
    """A whole sequence of one step (start and end): one [1, 1] INT64 `tokens` or
    BYTES `text` tensor, its raw contents `data`."""
    request = kpb.ModelInferRequest(model_name=name)
    request.parameters["sequence_id"].string_param = key
    request.parameters["sequence_start"].bool_param = True
    request.parameters["sequence_end"].bool_param = True
    datatype = "BYTES" if tensor == "text" else "INT64"
    request.inputs.add(name=tensor, datatype=datatype, shape=[1, 1])
    request.raw_input_contents.append(data)
    return request


@pytest.fixture(scope="module")
def served(fuzz_target) -> dict[str, Served]:
    """Every ready model, learned from RepositoryIndex, ModelConfig and ModelMetadata;
    which step models take `text`, from a sequence step that sends some."""
    stub = kpb_grpc.GRPCInferenceServiceStub(fuzz_target)

    def datatype(value) -> str:  # Triton's TYPE_STRING is the protocol's BYTES
        name = mc.DataType.Name(value).removeprefix("TYPE_")
        return "BYTES" if name == "STRING" else name

    models = {}
    for entry in stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models:
        config = stub.ModelConfig(kpb.ModelConfigRequest(name=entry.name)).config
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name=entry.name))
        batch = (-1,) if config.max_batch_size else ()
        state = config.sequence_batching.state
        inputs = [(t.name, datatype(t.data_type), batch + tuple(t.dims)) for t in config.input]
        inputs += [(s.input_name, datatype(s.data_type), batch + tuple(s.dims)) for s in state]
        listed = [(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs]
        assert set(listed) <= set(inputs), (entry.name, listed, inputs)
        logits = [tuple(t.shape) for t in meta.outputs if t.name == "logits"]
        sequence = config.HasField("sequence_batching")
        if sequence:
            space = _sequence_step(entry.name, "probe", "text", struct.pack("<I", 1) + b" ")
            try:
                text_ok = bool(stub.ModelInfer(space, timeout=30).outputs)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
                text_ok = False
        models[entry.name] = Served(
            name=entry.name,
            inputs=tuple(inputs),
            listed=tuple(name for name, _, _ in listed),
            outputs=tuple([t.name for t in config.output] + [s.output_name for s in state]),
            sequence=sequence,
            text=sequence and text_ok,
            vocab=logits[0][-1] if logits and any(n == "tokens" for n, _, _ in inputs) else 0,
        )
    assert set(models) == {"lenet5", "char_lstm", "char_lstm_prefill", "captioner"} | {
        "captioner_encoder"
    }
    assert models["char_lstm"].listed == ("tokens",) and models["char_lstm"].vocab > 0
    assert models["char_lstm"].text and not models["captioner"].text
    return models


def maybe(hostile: bool, valid, adversarial):
    """In a hostile request, three draws in four from `valid`; in a clean one, all (with
    several faults per field, a hostile request is hardly ever served). Hypothesis
    shrinks a failing example towards the valid draws, leaving only the faults that
    matter."""
    if not hostile:
        return valid
    return st.integers(0, 3).flatmap(lambda i: adversarial if i == 3 else valid)


@st.composite
def shapes(draw, allowed: tuple[int, ...], batch: int, length: int, hostile: bool) -> list[int]:
    """The allowed shape (batch on the first axis, `length` on other open ones); in a
    hostile request now and then a dimension or two poked to zero or huge, a rank off
    by one, or any dims at all."""
    shape = [(batch if i == 0 else length) if d == -1 else d for i, d in enumerate(allowed)]
    how = draw(st.sampled_from(["allowed"] * 6 + ["poked", "rank", "any"])) if hostile else ""
    if how == "poked" and shape:
        for _ in range(draw(st.integers(1, 2))):
            shape[draw(st.integers(0, len(shape) - 1))] = draw(st.sampled_from(HUGE))
    elif how == "rank":
        if shape and draw(st.booleans()):
            del shape[draw(st.integers(0, len(shape) - 1))]
        else:
            shape.insert(draw(st.integers(0, len(shape))), draw(st.sampled_from([1, 2, 0])))
    elif how == "any":
        shape = draw(st.lists(st.sampled_from([*HUGE, 2, 3, 32, -(2**63)]), max_size=6))
    return shape


@st.composite
def elements(draw, datatype: str, name: str, vocab: int, count: int, hostile: bool) -> list:
    """`count` values for a tensor of `datatype` named `name`, a few drawn values
    repeated: token ids in the vocabulary, small floats, text in the vocabulary; in a
    hostile request sometimes negative and huge ids, NaN and infinities, bytes that are
    not UTF-8, characters outside the vocabulary, a string past the prompt cap."""
    if datatype == "BYTES":
        in_vocabulary = st.text(alphabet="KINGQUEFOLwhatlig .\n", min_size=1, max_size=12)
        long = ["KING " * 3300] if count <= 1 else []  # 16,500 characters
        odd = st.one_of(
            st.binary(max_size=12),  # mostly not UTF-8
            text,
            st.sampled_from(["", "\u00e9t\u00e9", "\U0001f600", *long]),
        )
        items = draw(st.lists(maybe(hostile, in_vocabulary, odd), min_size=1, max_size=3))
        items = [i.encode() if isinstance(i, str) else i for i in items]
    elif datatype == "BOOL":
        items = draw(st.lists(st.booleans(), min_size=1, max_size=3))
    elif datatype.startswith("FP"):
        small = st.floats(-3, 3, width=32)
        items = draw(st.lists(maybe(hostile, small, floats32), min_size=1, max_size=3))
    else:
        ids = st.integers(0, max(vocab, 4) - 1) if name == "tokens" else st.integers(-3, 3)
        huge = st.sampled_from([-1, vocab, 2**31, 2**62, -(2**63), 2**63 - 1])
        items = draw(st.lists(maybe(hostile, ids, huge), min_size=1, max_size=3))
    return [items[i % len(items)] for i in range(count)]


def _encode(datatype: str, values: list) -> bytes:
    """Raw contents: numbers little-endian, BYTES each after its 4-byte length."""
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    with np.errstate(all="ignore"):  # FP16 overflows to inf: that is the point
        return np.asarray(values).astype(KSERVE_NUMPY[datatype]).tobytes()


@st.composite
def kserve_tensors(draw, request, spec, batch, length, vocab: int, form: str, hostile: bool):
    """Append one input to `request`: `spec`'s name, datatype and shape (in a hostile
    request now and then another), its contents raw, typed or both (`form`), sometimes
    of the wrong length. A tensor past the budgets gets a short payload."""
    name, datatype, allowed = spec
    names = st.sampled_from(["", "x", "text", "input", "tokens", "h"])
    name = draw(maybe(hostile, st.just(name), names))
    wrong = st.one_of(st.sampled_from([*KSERVE_NUMPY, "fp32", "", "TYPE_FP32"]), text)
    datatype = draw(maybe(hostile, st.just(datatype), wrong))
    shape = draw(shapes(allowed, batch, length, hostile))
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    kind = datatype if datatype in KSERVE_NUMPY else draw(st.sampled_from(list(KSERVE_NUMPY)))
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    size = count if kind == "BYTES" else count * np.dtype(KSERVE_NUMPY[kind]).itemsize
    fits = 0 <= size <= (BYTES_BUDGET if kind == "BYTES" else RAW_BUDGET)
    count = count if fits else draw(st.integers(0, 3))
    values = draw(elements(kind, name, vocab, count, hostile))
    if hostile and values and draw(st.integers(0, 5)) == 5:  # a few values short, or over
        cut = draw(st.integers(1, len(values)))
        values = values[:-cut] if draw(st.booleans()) else values + values[:cut]
    if form in ("raw", "both"):
        data = _encode(kind, values)
        if hostile and draw(st.integers(0, 7)) == 7:  # bytes cut mid-element
            data = data[: draw(st.integers(0, len(data)))]
        request.raw_input_contents.append(data)
    if form in ("typed", "both"):
        if kind.startswith(("INT", "UINT")):  # wrapped into the field's range
            values = np.asarray(values, np.int64).astype(KSERVE_NUMPY[kind]).tolist()
        # FP16 has no typed field: a client would try fp32_contents
        getattr(tensor.contents, CONTENTS.get(kind, "fp32_contents")).extend(values)


def _parameter(value, kind: str | None, payload) -> None:
    """Set one parameter's value of `kind`; None leaves it present with no value."""
    if kind is None:
        value.Clear()
    else:
        setattr(value, kind, payload)


@st.composite
def sequence_controls(draw, request, pool: list[int], hostile: bool) -> None:
    """`sequence_id` from `pool` (so steps meet) as uint64, int64 or string; in a hostile
    request sometimes of a wrong kind, huge, empty, "0" or negative. `sequence_start`
    and `sequence_end` as bools or absent; in a hostile request sometimes of a wrong
    kind."""
    params = request.parameters
    kind = draw(st.sampled_from(["uint64_param"] * 5 + ["int64_param", "string_param", "odd"]))
    if kind == "uint64_param":
        huge = st.sampled_from([0, 2**63, 2**64 - 1])
        value = draw(maybe(hostile, st.sampled_from(pool), huge))
    elif kind == "int64_param":
        negative = st.sampled_from([0, -1, -(2**63)])
        value = draw(maybe(hostile, st.sampled_from(pool), negative))
    elif kind == "string_param":
        odd = st.one_of(st.sampled_from(["", "0", "-3", "x" * 300, " 1"]), text)
        value = draw(maybe(hostile, st.sampled_from([str(i) for i in pool]), odd))
    elif hostile:
        kind, value = draw(
            st.sampled_from([("bool_param", True), ("bool_param", False), ("double_param", 1.0)])
            | st.just((None, None))  # a parameter with no value set
        )
    else:
        kind, value = "uint64_param", draw(st.sampled_from(pool))
    _parameter(params["sequence_id"], kind, value)
    wrong = [("int64_param", 1), ("string_param", "true"), ("double_param", 1.0), (None, 0)]
    for name, absent in (("sequence_start", 3), ("sequence_end", 4)):
        how = ["absent"] * absent + ["true"] * (absent - 1) + ["false"] + ["wrong"] * hostile
        how = draw(st.sampled_from(how))
        if how == "wrong":
            _parameter(params[name], *draw(st.sampled_from(wrong)))
        elif how != "absent":
            params[name].bool_param = how == "true"


@st.composite
def infer_requests(draw, served: dict[str, Served], pool: list[int]) -> kpb.ModelInferRequest:
    """A ModelInferRequest for a served model. One in three is clean (every field as the
    model takes it); the others are hostile: each field now and then wrong (another
    model name or version, inputs missing, duplicated or shuffled, names, datatypes,
    shapes, contents, sequence controls and requested outputs). On a step model, half
    carry sequence controls, with `tokens` or a language model's `text`."""
    hostile = draw(st.integers(0, 2)) > 0
    names = sorted(served)
    choice = draw(maybe(hostile, st.sampled_from(names), st.sampled_from([*names, "", "?"])))
    name = draw(text) if choice == "?" else choice
    model = served.get(name) or served[draw(st.sampled_from(names))]
    versions = st.one_of(st.sampled_from(["1", "2", "0", "-1"]), text)
    request = kpb.ModelInferRequest(
        model_name=name,
        model_version=draw(maybe(hostile, st.sampled_from(["", "", "", "1"]), versions)),
        id=draw(st.one_of(st.just(""), st.sampled_from(["a", "7"]), text)),
    )
    sequence = draw(st.integers(0, 7)) < (4 if model.sequence else int(hostile))
    if sequence:
        draw(sequence_controls(request, pool, hostile))
        specs = {n: (n, d, (1, 1) if n == "tokens" else s) for n, d, s in model.inputs}
        specs["text"] = ("text", "BYTES", (1, 1))
        which = st.sampled_from([["tokens"], ["tokens"], ["text" if model.text else "tokens"]])
        odd = st.sampled_from([["text"], ["tokens", "text"], [], ["h"], ["tokens", "c"]])
        chosen = [specs[n] for n in draw(maybe(hostile, which, odd)) if n in specs]
        batch, length = draw(maybe(hostile, st.just(1), st.sampled_from([0, 2, 65]))), 1
    else:
        listed = [s for s in model.inputs if s[0] in model.listed]
        odd = st.one_of(
            st.permutations(model.inputs),
            st.lists(st.sampled_from(model.inputs), max_size=1),  # one, or none
            st.sampled_from(model.inputs).map(lambda s: [*model.inputs, s]),  # one twice
        )
        chosen = draw(maybe(hostile, st.sampled_from([list(model.inputs), listed]), odd))
        batch = draw(maybe(hostile, st.sampled_from([1, 1, 2, 3, 64]), st.just(65)))
        length = draw(maybe(hostile, st.sampled_from([1, 4, 31, 16384]), st.just(16385)))
    forms = st.sampled_from(["raw", "raw", "typed"])
    form = draw(maybe(hostile, forms, st.sampled_from(["both", "none"])))
    for spec in chosen:
        draw(kserve_tensors(request, spec, batch, length, model.vocab, form, hostile))
    if hostile and form == "raw" and draw(st.integers(0, 9)) == 9:  # one entry off
        if request.raw_input_contents and draw(st.booleans()):
            del request.raw_input_contents[-1]
        else:
            request.raw_input_contents.append(b"")
    outputs = list(model.outputs) if not sequence else ["logits", "greedy_text"]
    wanted = draw(
        maybe(
            hostile,
            st.one_of(st.just([]), st.lists(st.sampled_from(outputs), unique=True, max_size=2)),
            st.lists(st.sampled_from([*outputs, "", "probabilities", "h"]), max_size=3),
        )
    )
    for output in wanted:
        request.outputs.add(name=output)
    if draw(st.integers(0, 5)) == 5:  # parameters Triton clients send, of either kind
        extra = draw(st.sampled_from(["triton_enable_empty_final_response", "priority", "timeout"]))
        kind, value = draw(st.sampled_from([("bool_param", True), ("int64_param", 2**40)]))
        _parameter(request.parameters[extra], kind, value)
    return request


@st.composite
def sequence_flows(draw, served: dict[str, Served], pool: list[int]) -> list:
    """One sequence on a step model from its start to its end, every step clean:
    `tokens`, or a language model's `text`, raw or typed."""
    model = served[draw(st.sampled_from(sorted(n for n, m in served.items() if m.sequence)))]
    key, steps = draw(st.sampled_from(pool)), draw(st.integers(1, 5))
    flow = []
    for i in range(steps):
        request = kpb.ModelInferRequest(model_name=model.name, id=f"{key}.{i}")
        request.parameters["sequence_id"].uint64_param = key
        if i == 0:
            request.parameters["sequence_start"].bool_param = True
        if i == steps - 1:
            request.parameters["sequence_end"].bool_param = True
        text_step = model.text and draw(st.booleans())
        spec = ("text", "BYTES", (1, 1)) if text_step else ("tokens", "INT64", (-1, 1))
        form = draw(st.sampled_from(["raw", "typed"]))
        draw(kserve_tensors(request, spec, 1, 1, model.vocab, form, hostile=False))
        flow.append(request)
    return flow


@st.composite
def streams(draw, served: dict[str, Served], ids: list[int]) -> list:
    """The requests of one ModelStreamInfer: up to six `infer_requests` and up to two
    whole sequences (`sequence_flows`), interleaved, each sequence's steps in order.
    Their sequence ids (from `ids`) overlap, so a stray request now and then steps,
    ends or restarts a sequence."""
    strays, whole = ids[:4], ids[2:]
    parts = [[r] for r in draw(st.lists(infer_requests(served, strays), max_size=6))]
    parts += draw(st.lists(sequence_flows(served, whole), max_size=2))
    if not parts:
        parts = [[draw(infer_requests(served, strays))]]
    order = []
    while any(parts):
        waiting = [i for i, part in enumerate(parts) if part]
        order.append(parts[draw(st.sampled_from(waiting))].pop(0))
    return order


def _check_outputs(rpc: str, response: kpb.ModelInferResponse, request=None) -> None:
    """Each output's bytes match its shape and datatype, and no float is NaN or inf."""
    assert len(response.outputs) == len(response.raw_output_contents), rpc
    if request is not None:
        assert (response.model_name, response.id) == (request.model_name, request.id)
        wanted = [o.name for o in request.outputs]
        assert not wanted or [o.name for o in response.outputs] == wanted
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        count = math.prod(output.shape)
        if output.datatype == "BYTES":
            assert output.shape == [1, 1] and raw[:4] == struct.pack("<I", len(raw) - 4)
            continue
        value = np.frombuffer(raw, KSERVE_NUMPY[output.datatype])
        assert value.size == count, (output.name, output.shape, len(raw))
        bad = np.flatnonzero(~np.isfinite(value)) if value.dtype.kind == "f" else []
        if len(bad):
            NAN_RESPONSES[rpc] += 1
            pytest.fail(
                f"{rpc}: {response.model_name}'s {output.name} {list(output.shape)} holds "
                f"{value[bad[:5]].tolist()} at flat indices {bad[:5].tolist()}"
            )


def _kserve_still_serves(channel) -> None:
    """A sequence step on char_lstm (through its engine) still gets finite logits."""
    key, three = f"health-{next(HEALTH_IDS)}", struct.pack("<q", 3)
    request = _sequence_step("char_lstm", key, "tokens", three)
    response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    _check_outputs("ModelInfer (health)", response)
    assert [o.name for o in response.outputs] == ["logits", "greedy_text"]


@FUZZ
@given(data=st.data())
def test_fuzz_model_infer(fuzz_target, served, data):
    """One request: a documented status, and an answer whose outputs are whole, finite
    and the ones asked for."""
    request = data.draw(infer_requests(served, [next(SEQUENCE_IDS)]), label="request")
    stub = kpb_grpc.GRPCInferenceServiceStub(fuzz_target)
    for response in _check(
        fuzz_target, "ModelInfer", lambda: [stub.ModelInfer(request, timeout=60)]
    ):
        _check_outputs("ModelInfer", response, request)
    _kserve_still_serves(fuzz_target)


@FUZZ
@given(data=st.data())
def test_fuzz_model_stream_infer(fuzz_target, served, data):
    """A stream of requests ends OK with one answer per request, in order: its
    `infer_response` or its `error_message`, never an internal error. A request without
    sequence controls is sent again as ModelInfer and gets the same error, whose status
    code is counted; a sequence step's answer depends on the steps before it, so its
    error is counted as a sequence error."""
    ids = [next(SEQUENCE_IDS) for _ in range(6)]
    requests = data.draw(streams(served, ids), label="requests")
    stub = kpb_grpc.GRPCInferenceServiceStub(fuzz_target)
    answers = _check(
        fuzz_target,
        "ModelStreamInfer",
        lambda: list(stub.ModelStreamInfer(iter(requests), timeout=60)),
    )
    assert len(answers) == len(requests), "the stream ended early"
    for request, answer in zip(requests, answers, strict=True):
        assert answer.infer_response.id == request.id
        message = answer.error_message
        step = "sequence_id" in request.parameters
        if not message:
            STREAM_ANSWERS[("ModelStreamInfer", "sequence OK" if step else "OK")] += 1
            _check_outputs("ModelStreamInfer", answer.infer_response, request)
            continue
        assert len(message.encode()) <= 1024, message[:200]
        if message.startswith(INTERNAL_MESSAGE) or message.endswith("non-finite logits"):
            STREAM_ANSWERS[("ModelStreamInfer", "INTERNAL")] += 1
            pytest.fail(f"ModelStreamInfer: {message}")
        if step:
            STREAM_ANSWERS[("ModelStreamInfer", "sequence error")] += 1
            continue
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=60)
        STREAM_ANSWERS[("ModelStreamInfer", info.value.code().name)] += 1
        assert info.value.code() in DOCUMENTED - {grpc.StatusCode.OK}
        assert info.value.details() == message
    _kserve_still_serves(fuzz_target)


@FUZZ
@given(
    method=st.sampled_from(
        ["ListModels", "Classify", "Generate", "Caption", "ModelInfer", "ModelStreamInfer"]
    ),
    data=st.one_of(
        st.binary(max_size=400),
        # Well-formed framing around a string field that is not UTF-8.
        st.binary(min_size=1, max_size=60).map(lambda b: b"\x0a" + bytes([len(b)]) + b),
        st.binary(min_size=1, max_size=60).map(lambda b: b"\x12" + bytes([len(b)]) + b),
    ),
)
def test_fuzz_raw_bytes(fuzz_target, method, data):
    path = f"/stepwise.v1.Inference/{method}"
    if method == "ModelStreamInfer":  # each request's error is its answer's error_message
        call = fuzz_target.stream_stream(
            f"/{KSERVE_ROOT}/{method}",
            response_deserializer=kpb.ModelStreamInferResponse.FromString,
        )
        _check(fuzz_target, f"{method} (bytes)", lambda: list(call(iter([data]), timeout=60)))
    elif method == "ModelInfer":
        call = fuzz_target.unary_unary(f"/{KSERVE_ROOT}/{method}")
        _check(fuzz_target, f"{method} (bytes)", lambda: [call(data, timeout=30)])
    elif method in ("Generate", "Caption"):
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
