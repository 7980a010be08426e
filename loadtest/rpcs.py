"""What one request is, per RPC: its inputs, and how one call is timed.

Every adapter talks through the generated stubs only (the wire contract), never
serving's internals. To add an RPC (a KServe `infer`, say), write one class with
`name`, `streaming`, `request_type`, `requests(options, channel)` and
`call(request, timeout, on_tokens)`, and add it to `RPCS` (`ModelInfer` is KServe's).
"""

from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

BUILT_IN_PROMPTS = [
    "ROMEO.\n",
    "KING.\nNow is the ",
    "HAMLET.\nTo be, or not to be",
    "JULIET.\nO ",
    "\n",
    "MACBETH.\nIs this a dagger which I see before me,",
    "",
    "PORTIA.\nThe quality of mercy is not strain'd,\n",
]


@dataclass
class Outcome:
    """One finished call. Times in microseconds from the moment the call was sent."""

    code: str  # "OK" or the gRPC status name
    latency_us: int  # to the last message (or the error)
    ttft_us: int | None = None  # streams: to the first message that carries output
    tokens: int = 0  # streams: output tokens received (as tokens/s counts them)
    gaps_us: list[int] = field(default_factory=list)  # between output messages


def _code(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else "UNKNOWN"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def digit_images(size: int) -> list[bytes]:
    """The ten digits drawn bright on black, resized to size x size, as PNG."""
    images = []
    for digit in range(10):
        canvas = Image.new("L", (8, 12), 0)
        ImageDraw.Draw(canvas).text((1, 0), str(digit), fill=255)
        images.append(_png(canvas.resize((size, size), Image.BILINEAR)))
    return images


def _input_shape(channel: grpc.Channel, model: str) -> list[int]:
    """The model's first input shape from ListModels, -1 axes as 1."""
    models = pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10).models
    for m in models:
        if m.name == model:
            return [1 if d < 0 else int(d) for d in m.inputs[0].shape]
    raise ValueError(f"--input-data tensor: the server has no model {model!r}")


def _unary(method, request, timeout: float) -> Outcome:
    """One unary call, timed from send to its status."""
    start = time.perf_counter_ns()
    try:
        method(request, timeout=timeout)
        code = "OK"
    except grpc.RpcError as err:
        code = _code(err)
    return Outcome(code, (time.perf_counter_ns() - start) // 1000)


class Classify:
    name, streaming = "classify", False
    request_type = pb.ClassifyRequest

    def __init__(self, channel: grpc.Channel):
        self.stub = pb_grpc.InferenceStub(channel)

    @staticmethod
    def requests(options, channel: grpc.Channel) -> list[pb.ClassifyRequest]:
        source = options.input_data
        if source == "digits":
            return [pb.ClassifyRequest(model=options.model, image=data)
                    for data in digit_images(options.image_size)]  # fmt: skip
        if source == "tensor":
            shape = _input_shape(channel, options.model)
            rng = np.random.default_rng(options.seed or 0)
            return [
                pb.ClassifyRequest(
                    model=options.model,
                    tensor=pb.Tensor(
                        dtype="float32",
                        shape=shape,
                        raw_data=rng.random(shape, np.float32).astype("<f4").tobytes(),
                    ),
                )
                for _ in range(8)
            ]
        folder = Path(source)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ValueError(f"--input-data {source}: no .png or .jpg files there")
        return [pb.ClassifyRequest(model=options.model, image=p.read_bytes()) for p in files]

    def call(self, request, timeout: float, on_tokens=None) -> Outcome:
        return _unary(self.stub.Classify, request, timeout)


class ModelInfer:
    """KServe's ModelInfer: batch-1 tensors of the shapes and datatypes the model's
    ModelMetadata lists, random floats and zero integers (token 0 is a valid id), as
    raw contents: what NVIDIA's perf_analyzer sends, for side-by-side figures."""

    name, streaming = "model_infer", False
    request_type = kpb.ModelInferRequest
    DTYPES = {"FP32": "<f4", "INT64": "<i8"}

    def __init__(self, channel: grpc.Channel):
        self.stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    @classmethod
    def requests(cls, options, channel: grpc.Channel) -> list[kpb.ModelInferRequest]:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name=options.model), timeout=10)
        rng, out = np.random.default_rng(options.seed or 0), []
        for _ in range(8):
            request = kpb.ModelInferRequest(model_name=options.model)
            for tensor in meta.inputs:
                if tensor.datatype not in cls.DTYPES:
                    raise ValueError(f"--rpc model_infer: {tensor.name} is {tensor.datatype}")
                shape = [1 if d < 0 else int(d) for d in tensor.shape]
                dtype = np.dtype(cls.DTYPES[tensor.datatype])
                value = rng.random(shape) if dtype.kind == "f" else np.zeros(shape)
                request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
                request.raw_input_contents.append(value.astype(dtype).tobytes())
            out.append(request)
        return out

    def call(self, request, timeout: float, on_tokens=None) -> Outcome:
        return _unary(self.stub.ModelInfer, request, timeout)


class _Stream:
    """A server-streaming RPC whose messages carry output `text`."""

    streaming = True
    method = ""

    def __init__(self, channel: grpc.Channel):
        self.rpc = getattr(pb_grpc.InferenceStub(channel), self.method)

    @staticmethod
    def tokens_in(response) -> int:
        raise NotImplementedError

    def call(self, request, timeout: float, on_tokens=None) -> Outcome:
        """One stream, timed; `on_tokens(n)` is called as each output message arrives."""
        start = last = time.perf_counter_ns()
        first, tokens, gaps = None, 0, []
        try:
            for response in self.rpc(request, timeout=timeout):
                now = time.perf_counter_ns()
                n = self.tokens_in(response)
                if n and on_tokens is not None:
                    on_tokens(n)
                if n:
                    if first is None:
                        first = now
                    else:
                        gaps.append((now - last) // 1000)
                    last, tokens = now, tokens + n
            code = "OK"
        except grpc.RpcError as err:
            code = _code(err)
        end = time.perf_counter_ns()
        ttft = None if first is None else (first - start) // 1000
        return Outcome(code, (end - start) // 1000, ttft, tokens, gaps)


class Generate(_Stream):
    name, method = "generate", "Generate"
    request_type = pb.GenerateRequest

    @staticmethod
    def tokens_in(response) -> int:
        return len(response.text)  # character-level models: a character is a token

    @staticmethod
    def requests(options, channel: grpc.Channel) -> list[pb.GenerateRequest]:
        if options.prompts_file:
            text = Path(options.prompts_file).read_text()
            prompts = [line.replace("\\n", "\n") for line in text.splitlines()]
        else:
            prompts = BUILT_IN_PROMPTS
        sampling = {
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "stream_interval_ms": getattr(options, "stream_interval_ms", None),
        }
        sampling = {k: v for k, v in sampling.items() if v is not None}
        rng = random.Random(options.seed)
        return [
            pb.GenerateRequest(
                model=options.model,
                prompt=prompt,
                seed=options.seed if options.seed is not None else rng.getrandbits(63),
                **sampling,
            )
            for prompt in prompts
        ]


class Caption(_Stream):
    name, method = "caption", "Caption"
    request_type = pb.CaptionRequest

    @staticmethod
    def tokens_in(response) -> int:
        return len(response.text.split())  # one or more words per message

    @staticmethod
    def requests(options, channel: grpc.Channel) -> list[pb.CaptionRequest]:
        from training.data.scenes import make_scenes  # Pillow only: no torch

        extra = {"max_length": options.max_length} if options.max_length else {}
        if getattr(options, "stream_interval_ms", None) is not None:
            extra["stream_interval_ms"] = options.stream_interval_ms
        return [
            pb.CaptionRequest(model=options.model, image=_png(image), **extra)
            for image, _, _ in make_scenes(16, seed=options.seed or 0)
        ]


RPCS = {cls.name: cls for cls in (Classify, Generate, Caption, ModelInfer)}
DEFAULT_MODELS = {
    "classify": "lenet5",
    "generate": "char_lstm",
    "caption": "captioner",
    "model_infer": "lenet5",
}
