"""The `stepwise.v1.Inference` servicer: protobuf <-> plain values, nothing more.

Each handler validates what the message says, asks the data plane
(`serving.dataplane.plane.DataPlane`) and turns its answer into the response; errors
become status codes in `serving.api.status`.
"""

from __future__ import annotations

import math
import time

import grpc
import numpy as np

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.api.clients import client_identity
from serving.api.limits import (
    MAX_BEAMS,
    MAX_CAPTION_WORDS,
    MAX_LOGPROBS,
    MAX_PROMPT_CHARS,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_STREAM_INTERVAL_MS,
    MAX_TENSOR_DIMS,
    MAX_TOKENS_DEFAULT,
    MAX_TOKENS_LIMIT,
    REPETITION_PENALTY_LIMIT,
    TEMPERATURE_LIMIT,
)
from serving.api.status import STALLED, streaming, unary
from serving.api.streams import StreamSlots
from serving.core.card import TensorSpec
from serving.core.models import Captioner, Classifier, LanguageModel
from serving.dataplane.plane import DataPlane
from serving.engine.sampler import SamplingParams
from serving.errors import Cancelled, InvalidArgument

TENSOR_DTYPES = {"float32": np.float32}


def tensor_to_array(tensor: pb.Tensor, field: str = "tensor") -> np.ndarray:
    if tensor.dtype not in TENSOR_DTYPES:
        raise InvalidArgument(
            f"{field}.dtype", f"got {tensor.dtype!r}; allowed: {', '.join(TENSOR_DTYPES)}"
        )
    dtype = np.dtype(TENSOR_DTYPES[tensor.dtype]).newbyteorder("<")
    if len(tensor.shape) > MAX_TENSOR_DIMS:
        raise InvalidArgument(
            f"{field}.shape", f"{len(tensor.shape)} dimensions; at most {MAX_TENSOR_DIMS}"
        )
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"got {shape}; dimensions must be >= 0")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.raw_data) != expected:
        raise InvalidArgument(
            f"{field}.raw_data",
            f"holds {len(tensor.raw_data)} bytes; shape {shape} of {tensor.dtype} needs {expected}",
        )
    return np.frombuffer(tensor.raw_data, dtype=dtype).astype(np.float32).reshape(shape)


def _tensor_specs(specs: tuple[TensorSpec, ...]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s.name, dtype=s.dtype, shape=s.shape) for s in specs]


def _temperature(request, default: float) -> float:
    temperature = request.temperature if request.HasField("temperature") else default
    if not 0 <= temperature <= TEMPERATURE_LIMIT:  # NaN fails too
        raise InvalidArgument(
            "temperature", f"got {temperature}; allowed 0 (greedy) to {TEMPERATURE_LIMIT}"
        )
    return temperature


def caption_params(request: pb.CaptionRequest, model_max: int) -> tuple[int, SamplingParams]:
    """Validate the captioning knobs; greedy unless a temperature is given."""
    default = min(model_max, MAX_CAPTION_WORDS)
    max_length = request.max_length if request.HasField("max_length") else default
    if not 1 <= max_length <= MAX_CAPTION_WORDS:
        raise InvalidArgument("max_length", f"got {max_length}; allowed 1 to {MAX_CAPTION_WORDS}")
    seed = request.seed if request.HasField("seed") else None
    temperature = _temperature(request, default=0.0)
    if not 0 <= request.beam_size <= MAX_BEAMS:
        raise InvalidArgument(
            "beam_size", f"got {request.beam_size}; allowed 0 or 1 (off) to {MAX_BEAMS}"
        )
    if request.beam_size > 1 and temperature > 0:
        raise InvalidArgument(
            "beam_size", "beam search is deterministic; leave temperature unset or 0"
        )
    return max_length, SamplingParams(temperature, seed=seed)


def sampling_params(request: pb.GenerateRequest, vocab_size: int) -> tuple[int, SamplingParams]:
    """Validate the generation knobs; return (max_tokens, sampling parameters)."""
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            "prompt", f"{len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}"
        )
    max_tokens = request.max_tokens if request.HasField("max_tokens") else MAX_TOKENS_DEFAULT
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument("max_tokens", f"got {max_tokens}; allowed 1 to {MAX_TOKENS_LIMIT}")
    temperature = _temperature(request, default=1.0)
    if not 0 <= request.top_k <= vocab_size:
        raise InvalidArgument("top_k", f"got {request.top_k}; allowed 0 (off) to {vocab_size}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidArgument("top_p", f"got {top_p}; allowed (0, 1]")
    if len(request.stop) > MAX_STOPS:
        raise InvalidArgument("stop", f"{len(request.stop)} strings; at most {MAX_STOPS}")
    for i, s in enumerate(request.stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(
                f"stop[{i}]", f"{len(s)} characters; allowed 1 to {MAX_STOP_CHARS}"
            )
    penalty = request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
    if not 0 < penalty <= REPETITION_PENALTY_LIMIT:  # NaN fails too
        raise InvalidArgument(
            "repetition_penalty",
            f"got {penalty:g}; allowed (0, {REPETITION_PENALTY_LIMIT:g}], 1 for off",
        )
    if not 0 <= request.min_tokens <= max_tokens:
        raise InvalidArgument(
            "min_tokens", f"got {request.min_tokens}; allowed 0 to max_tokens ({max_tokens})"
        )
    logprobs = request.logprobs if request.HasField("logprobs") else -1
    if request.HasField("logprobs") and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidArgument("logprobs", f"got {logprobs}; allowed 0 to {MAX_LOGPROBS}")
    seed = request.seed if request.HasField("seed") else None
    return max_tokens, SamplingParams(
        temperature, request.top_k, top_p, seed, penalty, request.min_tokens, logprobs
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        plane: DataPlane,
        streams: StreamSlots,
        identify=None,
        stream_interval_ms: int = 0,
    ):
        """Handlers run on the server's event loop and never block it (the data plane
        sends blocking work to its worker pool); a stream holds no thread, only a slot
        (`streams`: global and per-client caps, stall watchdog) and a row in its
        model's engine."""
        self.plane = plane
        self.streams = streams
        self.identify = identify or client_identity  # quota key: context -> client
        self.stream_interval_ms = stream_interval_ms  # for requests that leave it unset

    @unary
    async def ListModels(self, request, context):
        models = []
        for model in self.plane.models():
            metrics = {
                k: str(v) for k, v in model.metrics.items() if isinstance(v, (int, float, str))
            }
            models.append(
                pb.ModelInfo(
                    name=model.name,
                    version=model.version,
                    kind=model.kind,
                    inputs=_tensor_specs(model.card.inputs),
                    outputs=_tensor_specs(model.card.outputs),
                    execution_provider=model.provider,
                    labels=getattr(model, "labels", []),
                    metadata={"arch": model.card.arch, **metrics},
                )
            )
        return pb.ListModelsResponse(models=models)

    @unary
    async def Classify(self, request, context):
        model: Classifier = self.plane.model(request.model, Classifier.kind)
        which = request.WhichOneof("input")
        with self.plane.timed(model) as timing:
            result = await self.plane.classify(
                model,
                request.top_k,
                image=request.image if which == "image" else None,
                # decoded on the worker pool, with the image's decoding
                tensor=(lambda: tensor_to_array(request.tensor)) if which == "tensor" else None,
                timing=timing,
            )
        return pb.ClassifyResponse(
            model=model.name,
            version=model.version,
            classes=[
                pb.ClassProbability(index=i, label=label, probability=p)
                for i, label, p in result.classes
            ],
        )

    @streaming
    async def Generate(self, request, context):
        model: LanguageModel = self.plane.model(request.model, LanguageModel.kind)
        with self.plane.timed(model) as timing:
            max_tokens, params = sampling_params(request, len(model.vocab))
            stream = self.plane.generate(
                model, request.prompt, max_tokens, params, list(request.stop),
                _deadline(context), timing, self._interval(request),
            )  # fmt: skip
            async for delta in self._held(stream, context):
                yield pb.GenerateResponse(
                    text="".join(delta.pieces),
                    finish_reason=delta.finish_reason,
                    prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                    seed=delta.seed,
                    logprobs=[_token_logprob(model.vocab, lp) for lp in delta.logprobs],
                    queue_time_us=delta.queue_time_us,
                    time_to_first_token_us=delta.time_to_first_token_us,
                )

    @streaming
    async def Caption(self, request, context):
        model: Captioner = self.plane.model(request.model, Captioner.kind)
        with self.plane.timed(model) as timing:
            max_length, params = caption_params(request, model.max_length)
            stream = self.plane.caption(
                model, request.image, max_length, params, request.beam_size,
                _deadline(context), timing, self._interval(request),
            )  # fmt: skip
            words = []
            async for delta in self._held(stream, context):
                words += delta.pieces
                yield pb.CaptionResponse(
                    text=" ".join(delta.pieces),
                    finish_reason=delta.finish_reason,
                    caption=" ".join(words) if delta.finished else "",
                    completion_tokens=delta.completion_tokens,
                    seed=delta.seed,
                    queue_time_us=delta.queue_time_us,
                    time_to_first_token_us=delta.time_to_first_token_us,
                    beams=[
                        pb.Beam(
                            caption=" ".join(b.words),
                            score=b.score,
                            completion_tokens=b.tokens,
                            finish_reason="eos" if b.finished else "length",
                        )
                        for b in delta.beams or ()
                    ],
                )

    def _interval(self, request) -> int:
        """The request's stream_interval_ms, or the server's when unset."""
        if not request.HasField("stream_interval_ms"):
            return self.stream_interval_ms
        interval = request.stream_interval_ms
        if interval > MAX_STREAM_INTERVAL_MS:
            raise InvalidArgument(
                "stream_interval_ms",
                f"got {interval}; allowed 0 (a message per token) to {MAX_STREAM_INTERVAL_MS}",
            )
        return interval

    def _held(self, stream, context):
        """The stream's deltas inside a stream slot (waiting for one, fairly, when all
        are taken); a client that stops reading is cancelled by the slots' watchdog."""
        return self.streams.run(
            stream, self.identify(context), lambda: stream.cancel(Cancelled(STALLED))
        )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _token_logprob(vocab: list[str], lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=vocab[lp.token],
        id=lp.token,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token=vocab[t], id=t, logprob=v) for t, v in lp.top],
    )
