"""The gRPC transport: protobuf <-> numpy and strings, errors -> status codes.

All request validation lives here or in the core it calls; any ServingError
becomes its status code with a message naming the field; anything unexpected
becomes INTERNAL and is logged, and the server carries on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.api.clients import client_identity
from serving.api.streams import StreamSlots
from serving.batching.dynamic import DynamicBatcher
from serving.core.models import Captioner, Classifier, LanguageModel
from serving.core.preprocess import ImageDecoder
from serving.core.repository import ModelRegistry
from serving.engine import Delta, Sequence, StepEngine, caption_request, text_request
from serving.engine.beam import beam_search
from serving.engine.sampler import SamplingParams
from serving.errors import Cancelled, InvalidArgument, NonFiniteOutput, ServingError, Unavailable
from serving.metrics.statistics import RequestTiming, Statistics

log = logging.getLogger(__name__)

MAX_TOKENS_DEFAULT, MAX_TOKENS_LIMIT = 256, 4096
TEMPERATURE_LIMIT = 10.0
REPETITION_PENALTY_LIMIT = 10.0
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 8, 64
MAX_PROMPT_CHARS = 16_384
MAX_CAPTION_WORDS = 64
MAX_BEAMS = 16
CLASSIFY_TOP_K_DEFAULT = 5
TENSOR_DTYPES = {"float32": np.float32}
MAX_TENSOR_DIMS = 8  # far above any model's rank; numpy itself stops at 64
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


def add_to_server(servicer, server, module=pb, service_name: str = "Inference") -> None:
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


def _tensor_specs(specs: list[dict]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=s["name"], dtype=s["dtype"], shape=s["shape"]) for s in specs]


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
        registry: ModelRegistry,
        streams: StreamSlots,
        images: ImageDecoder,
        engines: dict[str, StepEngine],
        batchers: dict[str, DynamicBatcher] | None = None,
        workers: Executor | None = None,
        statistics: Statistics | None = None,
        identify=None,
    ):
        """The parts come from `create_server`, built from one ServerConfig.

        Handlers run on the server's event loop and never block it: decoding, graph runs
        and dynamic-batcher waits go to `workers` (a thread pool); a stream holds no
        thread at all, only a slot (`streams`) and a row in its model's engine."""
        self.registry = registry
        self.batchers = batchers or {}  # model name -> its dynamic batcher (unary calls)
        self.engines = engines  # step model name -> its continuous-batching engine
        self.streams = streams  # admission: global and per-client caps, stall watchdog
        self.identify = identify or client_identity  # quota key: context -> client
        self.images = images
        self.workers = workers
        self.statistics = statistics or Statistics()  # per model, every protocol's calls

    async def _blocking(self, fn, *args):
        """Run `fn(*args)` on the worker pool; the event loop goes on serving."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    @unary
    async def ListModels(self, request, context):
        models = []
        for name, model in sorted(self.registry.models.items()):
            metrics = {
                k: str(v) for k, v in model.metrics.items() if isinstance(v, (int, float, str))
            }
            models.append(
                pb.ModelInfo(
                    name=name,
                    version=model.version,
                    kind=model.kind,
                    inputs=_tensor_specs(model.card["inputs"]),
                    outputs=_tensor_specs(model.card["outputs"]),
                    execution_provider=model.provider,
                    labels=getattr(model, "labels", []),
                    metadata={"arch": model.card.get("arch", ""), **metrics},
                )
            )
        return pb.ListModelsResponse(models=models)

    @unary
    async def Classify(self, request, context):
        model: Classifier = self.registry.get(request.model, Classifier.kind)
        batcher = self.batchers.get(model.name)
        if batcher is not None and getattr(batcher.run, "__self__", None) is not model:
            batcher = None  # a reload swapped the model: run this one on a worker
        with self.statistics[model.name].request() as timing:
            if batcher is None:  # decode and run on a worker
                return await self._blocking(self._classify_here, model, request, timing)
            # Decode on a worker, then wait for the batch on the loop (no worker held).
            with batcher.lease():  # a reload retires this batcher only after the request
                x, top_k = await self._blocking(self._classify_input, model, request, timing)
                try:
                    logits = await asyncio.wrap_future(batcher.enqueue(x, timing))
                except NonFiniteOutput as exc:
                    raise _overflow(model, request, x, exc) from None
            response = _classify_response(model, model.softmax(logits), top_k)
            timing.mark("output")
            return response

    def _classify_input(self, model: Classifier, request, timing: RequestTiming):
        timing.mark("queue")  # waited for a worker
        x, top_k = _classify_input(self.images, model, request)
        timing.mark("input")
        return x, top_k

    def _classify_here(self, model: Classifier, request, timing: RequestTiming):
        x, top_k = self._classify_input(model, request, timing)
        try:
            probs = model.probabilities(x[None])[0]
        except NonFiniteOutput as exc:
            raise _overflow(model, request, x, exc) from None
        timing.mark("infer")
        self.statistics[model.name].execution(1, timing.ns["infer"])
        response = _classify_response(model, probs, top_k)
        timing.mark("output")
        return response

    @streaming
    async def Generate(self, request, context):
        model: LanguageModel = self.registry.get(request.model, LanguageModel.kind)
        with self.statistics[model.name].request() as timing:
            async for response in self._generate(model, request, context, timing):
                yield response

    async def _generate(self, model: LanguageModel, request, context, timing: RequestTiming):
        max_tokens, params = sampling_params(request, len(model.vocab))
        seq = text_request(model, request.prompt, max_tokens, params, list(request.stop))
        async for delta in self._stream(model, lambda: seq, context, timing):
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
        model: Captioner = self.registry.get(request.model, Captioner.kind)
        with self.statistics[model.name].request() as timing:
            async for response in self._caption(model, request, context, timing):
                yield response

    async def _caption(self, model: Captioner, request, context, timing: RequestTiming):
        max_length, params = caption_params(request, model.max_length)
        if request.beam_size > 1:
            async for response in self._beam_caption(model, request, max_length, context):
                yield response
            timing.mark("infer")  # beam search runs its own batch: all of it is compute
            return

        def sequence():  # decoding and encoding, too, happen inside a stream slot
            image = self.images.tensor(request.image, model.preprocess)
            return caption_request(model, image, max_length, params)

        words = []
        async for delta in self._stream(model, sequence, context, timing):
            words += delta.pieces
            yield pb.CaptionResponse(
                text=" ".join(delta.pieces),
                finish_reason=delta.finish_reason,
                caption=" ".join(words) if delta.finished else "",
                completion_tokens=delta.completion_tokens,
                seed=delta.seed,
                queue_time_us=delta.queue_time_us,
                time_to_first_token_us=delta.time_to_first_token_us,
            )

    async def _beam_caption(self, model: Captioner, request, max_length: int, context):
        """Beam search, one step at a time on the worker pool (a batch of beam_size
        rows of its own), inside a stream slot like every stream."""
        state = {"active": True, "stalled": False}

        def cancel():  # the watchdog's thread
            state["active"], state["stalled"] = False, True

        async def events():
            image = await self._blocking(self.images.tensor, request.image, model.preprocess)
            initial = await self._blocking(model.initial_state, image)
            search = beam_search(
                model, initial, request.beam_size, max_length, lambda: state["active"]
            )
            try:
                while (event := await self._blocking(next, search, None)) is not None:
                    yield event
            finally:
                state["active"] = False

        words, start, first = [], time.monotonic(), 0.0
        async for event in self.streams.run(events(), self.identify(context), cancel):
            if state["stalled"]:
                break
            words += event.words
            first = first or (time.monotonic() if event.words else 0.0)
            if event.beams is None:
                yield pb.CaptionResponse(text=" ".join(event.words))
                continue
            best = event.beams[0] if event.beams else None
            yield pb.CaptionResponse(
                text=" ".join(event.words),
                finish_reason=("eos" if best.finished else "length") if best else "length",
                caption=" ".join(words),
                completion_tokens=best.tokens if best else 0,
                time_to_first_token_us=int(((first or time.monotonic()) - start) * 1e6),
                beams=[
                    pb.Beam(
                        caption=" ".join(b.words),
                        score=b.score,
                        completion_tokens=b.tokens,
                        finish_reason="eos" if b.finished else "length",
                    )
                    for b in event.beams
                ],
            )
        if state["stalled"]:  # the watchdog stopped the search: never end it OK
            raise Cancelled(STALLED)

    def _stream(self, model, sequence, context: grpc.aio.ServicerContext, timing: RequestTiming):
        """Hold a stream slot (waiting for one, fairly, when all are taken), build the
        sequence (on the worker pool: it may decode an image), submit it to the model's
        engine and yield its deltas as they accumulate. A cancelled, timed-out or
        disconnected stream (its task cancelled) leaves the batch at the next iteration;
        a client that stops reading is cancelled by the slots' watchdog."""
        stalled, live = threading.Event(), {}

        def cancel():  # the watchdog's thread: free the row now, tell the client later
            stalled.set()
            if "seq" in live:
                live["engine"].cancel(live["seq"])

        async def deltas():
            engine = self.engines.get(model.name)
            if engine is None or engine.scheduler.model is not model:  # swapped by a reload
                raise Unavailable(f"{model.name} was reloaded as this request began; retry")
            with engine.lease():  # a reload retires this engine only after the stream
                seq: Sequence = await self._blocking(sequence)
                timing.mark("input")
                live["engine"], live["seq"] = engine, seq
                remaining = context.time_remaining()
                if remaining is not None:
                    seq.deadline = time.monotonic() + remaining
                reader = OutboxReader(seq.outbox)
                engine.submit(seq)
                try:
                    while True:
                        delta = await reader.next()
                        if delta.error is not None:
                            raise delta.error
                        if delta.finished:  # it waited for a batch row, then ran in the batch
                            timing.engine(delta.queue_time_us * 1000)
                        yield delta
                        if stalled.is_set():
                            raise Cancelled(STALLED)
                        if delta.finished:
                            return
                finally:
                    engine.cancel(seq)  # a no-op once it finished; else it leaves at once

        return self.streams.run(deltas(), self.identify(context), cancel)


class OutboxReader:
    """Awaits an engine outbox from the event loop: the engine's thread wakes the loop
    once per wait (the outbox is armed only while nothing is there to take)."""

    def __init__(self, outbox):
        loop, self._outbox, self._ready = asyncio.get_running_loop(), outbox, asyncio.Event()
        outbox.on_ready = lambda: loop.call_soon_threadsafe(self._ready.set)

    async def next(self) -> Delta:
        """Everything the sequence produced since the previous call, waiting for some."""
        while True:
            self._ready.clear()
            delta = self._outbox.take_or_arm()
            if delta is not None:
                return delta
            await self._ready.wait()


# An asyncio server cannot reset one HTTP/2 stream, and a status queues behind the
# messages the client has not taken: the stalled stream's slot and batch row are freed
# at once, and the client gets this status as soon as it reads again.
STALLED = "the client took no message for too long; the stream was cancelled"


def _classify_input(images: ImageDecoder, model: Classifier, request) -> tuple[np.ndarray, int]:
    """The request's input as the model's tensor [C, H, W], and its validated top_k."""
    which = request.WhichOneof("input")
    if which == "image":
        x = images.tensor(request.image, model.preprocess)
    elif which == "tensor":
        x = model.check_tensor(tensor_to_array(request.tensor))
    else:
        raise InvalidArgument("input", "set one of image (encoded PNG/JPEG) or tensor")
    classes = len(model.labels)
    top_k = request.top_k or min(CLASSIFY_TOP_K_DEFAULT, classes)
    if not 1 <= top_k <= classes:
        raise InvalidArgument(
            "top_k",
            f"got {request.top_k}; allowed 0 (default "
            f"{min(CLASSIFY_TOP_K_DEFAULT, classes)}) to {classes}",
        )
    return x, top_k


def _overflow(model: Classifier, request, x: np.ndarray, exc: NonFiniteOutput) -> Exception:
    """A tensor the client sent that overflows the network is the client's error; a
    preprocessed image is in range, so there the model is at fault (INTERNAL)."""
    if request.WhichOneof("input") != "tensor":
        return exc
    largest = float(np.max(np.abs(x)))
    return InvalidArgument(
        "tensor.raw_data",
        f"values up to magnitude {largest:.3g} overflow {model.name} ({exc}); send the "
        "preprocessed range the model was trained on",
    )


def _classify_response(model: Classifier, probs: np.ndarray, top_k: int) -> pb.ClassifyResponse:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return pb.ClassifyResponse(
        model=model.name,
        version=model.version,
        classes=[
            pb.ClassProbability(index=int(i), label=model.labels[i], probability=float(probs[i]))
            for i in order
        ],
    )


def _token_logprob(vocab: list[str], lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token=vocab[lp.token],
        id=lp.token,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token=vocab[t], id=t, logprob=v) for t, v in lp.top],
    )
