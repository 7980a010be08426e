"""The KServe V2 (Open Inference Protocol) gRPC service, `inference.GRPCInferenceService`,
on the same port as `stepwise.v1.Inference` (issue 9).

Served: liveness and readiness (server and models), server and model metadata, each
model's `config.pbtxt` as Triton's `ModelConfigResponse`, the repository index,
`ModelInfer` and `ModelStreamInfer` on each model's `model.onnx` as plain tensors (a
step graph's state is an ordinary input and output), server-held sequence state
(`sequence_id`, `sequence_start`, `sequence_end` parameters: the client sends `tokens`,
or a language model's `text` as BYTES, and gets `logits` and the greedy next token as
`greedy_text`; each step joins the model's continuous batch), and per-model statistics
for every protocol's inferences, and repository load/unload with
`--model-control-mode explicit` (FAILED_PRECONDITION otherwise). `ServerMetadata.extensions`
lists exactly what is served. Tensors <-> numpy: `kserve_codec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import threading

import numpy as np

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.api.clients import client_identity
from serving.api.kserve_codec import (
    DATATYPES,
    InputLimits,
    add_output,
    check_limits,
    check_values,
    decode_inputs,
)
from serving.api.stepwise import (
    MAX_PROMPT_CHARS,
    STALLED,
    OutboxReader,
    Undecodable,
    status_of,
    streaming,
    unary,
)
from serving.api.stepwise import add_to_server as _add
from serving.api.streams import StreamSlots
from serving.core.model_config import (
    DEFAULT_MAX_BATCH_SIZE,
    PLATFORM,
    config_for_card,
)
from serving.core.repository import ModelRegistry
from serving.dataplane.sequences import MAX_SEQUENCES, SequenceStore, idle_us, sequence_parameters
from serving.engine import step_request
from serving.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NonFiniteOutput,
    NotFound,
    Unavailable,
    Unimplemented,
)
from serving.metrics.statistics import Statistics

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "stepwise"


def _installed_version() -> str:
    """The installed package's version (pyproject.toml's, at install time)."""
    try:
        return importlib.metadata.version("stepwise")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "0+unknown"


SERVER_VERSION = _installed_version()
# Exactly what is served, in Triton's extension names (ModelStreamInfer is part of
# Triton's gRPC service itself and has no extension name).
EXTENSIONS = ("model_configuration", "model_repository", "sequence", "statistics")
# Requests of one ModelStreamInfer stream in flight at once; the next is read when
# the oldest has been answered (answers go out in request order).
STREAM_WINDOW = 32
# Bytes one ModelStreamInfer stream may hold: requests read and not yet answered, and
# answers its client has not taken. Past it the next request is not read (one request
# of any allowed size always is), so a client that never reads holds this much at most.
STREAM_BUDGET_BYTES = 32 * 1024 * 1024
# A language model's sequence step may send its input as text: one UTF-8 string.
TEXT_INPUT = {"name": "text", "dtype": "object", "shape": [1, 1]}
SEQUENCE_OUTPUTS = ("logits", "greedy_text")


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        workers=None,
        engines=None,
        statistics: Statistics | None = None,
        batchers: dict | None = None,
        streams: StreamSlots | None = None,
        identify=None,
        max_sequences_per_client: int = MAX_SEQUENCES,
    ):
        self.registry = registry
        # ModelStreamInfer streams hold slots of their own (an idle stream is normal for
        # a KServe client, and must not take Generate's), with the same stall watchdog
        self.streams = streams or StreamSlots(256)
        self.identify = identify or client_identity  # quota key: context -> client
        self.max_sequences_per_client = max_sequences_per_client
        self.batchers = batchers or {}  # classifier name -> its dynamic batcher
        self.control = None  # serving.dataplane.control.ModelControl: repository load and unload
        self.workers = workers  # graph runs happen here, never on the event loop
        self.engines = engines or {}  # step model name -> its continuous-batching engine
        self.statistics = statistics or Statistics()  # shared with the stepwise service
        self.sequences: dict[str, SequenceStore] = {}  # model name -> server-held state
        self.accepting = True  # false once shutdown begins: ServerReady says so at once

    def _model(self, name: str, version: str):
        model = self.registry.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.registry.models)) or "none"
            raise NotFound(f"model_name: no model named {name!r}; available: {known}")
        if version and version != model.version:
            raise NotFound(
                f"model_version: {name!r} has no version {version!r}; served: {model.version}"
            )
        return model

    @unary
    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self.accepting and bool(self.registry.models))

    @unary
    async def ModelReady(self, request, context):
        model = self.registry.models.get(request.name)
        ready = model is not None and request.version in ("", model.version)
        return kpb.ModelReadyResponse(ready=ready and self.accepting)

    @unary
    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    @unary
    async def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version)

        def tensors(specs):
            return [
                kpb.ModelMetadataResponse.TensorMetadata(
                    name=s["name"], datatype=DATATYPES[s["dtype"]], shape=s["shape"]
                )
                for s in specs
            ]

        # A step model's state is implicit, as in Triton's sequence batcher: the metadata
        # lists what a sequence step takes and gives (what perf_analyzer sends and asks
        # for); explicit state in a request without `sequence_id` is still accepted.
        hidden = {n for s in getattr(model, "state", []) for n in (s["input"], s["output"])}
        return kpb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=tensors([t for t in model.card["inputs"] if t["name"] not in hidden]),
            outputs=tensors([t for t in model.card["outputs"] if t["name"] not in hidden]),
        )

    @unary
    async def ModelConfig(self, request, context):
        model = self._model(request.name, request.version)
        config = model.config
        if not config.input:  # no config.pbtxt: what export would have written
            config = config_for_card(model.card)
        return kpb.ModelConfigResponse(config=config)

    @unary
    async def RepositoryIndex(self, request, context):
        models = [
            kpb.RepositoryIndexResponse.ModelIndex(name=n, version=m.version, state="READY")
            for n, m in sorted(self.registry.models.items())
        ]
        if not request.ready:  # models that failed to load, with the reason
            models += [
                kpb.RepositoryIndexResponse.ModelIndex(name=n, state="UNAVAILABLE", reason=r)
                for n, r in sorted(self.registry.failed.items())
            ]
            models += [  # a version that failed while an older one serves
                kpb.RepositoryIndexResponse.ModelIndex(
                    name=n, version=v, state="UNAVAILABLE", reason=r
                )
                for (n, v), r in sorted(self.registry.failed_versions.items())
                if n not in self.registry.failed
            ]
        return kpb.RepositoryIndexResponse(models=models)

    @unary
    async def ModelInfer(self, request, context):
        return await self._infer(request, lambda: self.identify(context))

    @streaming
    async def ModelStreamInfer(self, request_iterator, context):
        """Each request answered in request order by a `ModelStreamInferResponse`: its
        `infer_response`, or its `error_message` (the stream goes on). Up to
        STREAM_WINDOW requests run at once, so independent sequences on one stream share
        a batch; the steps of one sequence run one after another, as sent. The stream
        holds a slot (`serving.api.streams`), at most STREAM_BUDGET_BYTES of requests and
        answers, and is cancelled when its client takes no answer for the stall timeout."""
        client = self.identify(context)
        loop, stalled, drop = asyncio.get_running_loop(), threading.Event(), []

        def cancel():  # the watchdog's thread: free what the stream holds now
            stalled.set()
            loop.call_soon_threadsafe(lambda: [f() for f in drop])

        answers = self._stream_answers(request_iterator, client, drop)
        try:
            async with contextlib.aclosing(self.streams.run(answers, client, cancel)) as held:
                async for response in held:
                    if stalled.is_set():
                        break
                    yield response
        finally:
            await answers.aclose()
        if stalled.is_set():  # told when its client reads again (serving.api.stepwise.STALLED)
            raise Cancelled(STALLED)

    async def _stream_answers(self, request_iterator, client: str, drop: list):
        window = asyncio.Semaphore(STREAM_WINDOW)
        budget = _ByteBudget(STREAM_BUDGET_BYTES)
        answers: asyncio.Queue = asyncio.Queue()  # tasks in request order; None: the end
        last: dict[str, asyncio.Task] = {}  # sequence id -> its latest step on this stream

        async def read():
            try:
                async for request in request_iterator:
                    await window.acquire()
                    size = 0 if isinstance(request, Undecodable) else request.ByteSize()
                    await budget.take(size)
                    key = _sequence_key(request)
                    answer = self._stream_answer(request, last.get(key), lambda: client)
                    task = asyncio.ensure_future(answer)
                    task.add_done_callback(lambda t, n=size: budget.swap(n, t))
                    if key is not None:
                        last[key] = task
                        task.add_done_callback(lambda t, k=key: last.get(k) is t and last.pop(k))
                    answers.put_nowait(task)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())

        def drop_everything():  # stalled: its requests and unsent answers go
            reader.cancel()
            while not answers.empty():
                task = answers.get_nowait()
                if task is not None:
                    task.cancel()

        drop.append(drop_everything)
        try:
            while (task := await answers.get()) is not None:
                response = await task
                window.release()
                yield response
                budget.give(budget.sizes.pop(task, 0))  # taken by the client
            if not reader.cancelled():  # cancelled: the stream stalled, and says so
                await reader  # a request stream that broke ends this one with its status
        finally:
            drop_everything()

    async def _stream_answer(self, request, after: asyncio.Task | None, client):
        """One stream request's answer; an error becomes its `error_message`."""
        if after is not None:  # the previous step of the same sequence goes first
            await asyncio.wait([after])
        try:
            if isinstance(request, Undecodable):
                request.check()
            response = await self._infer(request, client)
            # tritonclient's enable_empty_final_response: mark this the request's last
            # (and only) response, as Triton does for a model that is not decoupled.
            final = request.parameters.get("triton_enable_empty_final_response")
            if final is not None and final.bool_param:
                response.parameters["triton_final_response"].bool_param = True
            return kpb.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:  # noqa: BLE001 - every error becomes this request's answer
            _, message = status_of(exc)
            echo = {} if isinstance(request, Undecodable) else {"id": request.id}
            return kpb.ModelStreamInferResponse(
                error_message=message, infer_response=kpb.ModelInferResponse(**echo)
            )

    async def _infer(self, request, client) -> kpb.ModelInferResponse:
        """Run the model's graph (`model.onnx`: a classifier, or a step model's step
        graph with its state as plain inputs and outputs) on the request's tensors; with
        a `sequence_id` parameter on a step model, the server holds the state for the
        client `client()` names (asked only then: it reads the call's metadata)."""
        model = self._model(request.model_name, request.model_version)
        stats = self.statistics[model.name]
        with stats.request() as timing:
            if "sequence_id" in request.parameters:
                return await self._sequence_step(model, request, timing, client())
            state = [s["input"] for s in getattr(model, "state", [])]
            limits = input_limits(model)
            check_limits(_shapes(request), limits, model.name)  # before the bytes are copied
            feeds = decode_inputs(request, model.card["inputs"], optional=state)
            check_values(feeds, limits, model.name)
            if state and not any(name in feeds for name in state):
                # Triton's implicit state starts at zero: a step model's metadata lists
                # `tokens` alone, and a request that follows it steps from zeros
                feeds.update(model.zero_state(len(feeds["tokens"])))
            first = next(iter(feeds.values()), None)
            timing.count = int(first.shape[0]) if first is not None and first.ndim else 1
            names = [t["name"] for t in model.card["outputs"]]
            wanted = _requested(request, names, model.name)
            timing.mark("input")
            batcher = self.batchers.get(model.name)
            if batcher is not None and getattr(batcher.run, "__self__", None) is model:
                # a classifier's rows join its dynamic batch
                return await self._batched(model, request, batcher, feeds, timing)
            session = model.graphs["step"] if hasattr(model, "graphs") else model.session

            def run():
                timing.mark("queue")  # waited for a worker
                values = session.run(wanted, feeds)
                timing.mark("infer")
                stats.execution(timing.count, timing.ns["infer"])
                return values

            try:
                values = await asyncio.get_running_loop().run_in_executor(self.workers, run)
            except Exception as exc:  # noqa: BLE001 - ORT rejects what its graph cannot take
                raise InvalidArgument("inputs", f"the graph refused them: {exc}"[:400]) from None
            if any(v.dtype.kind == "f" and not np.all(np.isfinite(v)) for v in values):
                raise InvalidArgument(
                    "inputs", f"{model.name} produced non-finite values from them (out of range?)"
                )
            response = kpb.ModelInferResponse(
                model_name=model.name, model_version=model.version, id=request.id
            )
            for name, value in zip(wanted, values, strict=True):
                add_output(response, name, value)
            timing.mark("output")
            return response

    async def _batched(self, model, request, batcher, feeds, timing) -> kpb.ModelInferResponse:
        """Each row of the request's batch goes through the model's dynamic batcher (the
        same queue as Classify's), so concurrent requests run together."""
        x = feeds[model.input["name"]]
        with batcher.lease():  # a reload retires this batcher only after the request
            futures = batcher.enqueue_rows(x, timing)  # every row queued, or none
            try:
                rows = [await asyncio.wrap_future(f) for f in futures]
            except NonFiniteOutput:
                raise InvalidArgument(
                    "inputs", f"{model.name} produced non-finite values from them (out of range?)"
                ) from None
        response = kpb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        add_output(response, "logits", np.stack(rows))
        timing.mark("output")
        return response

    async def _sequence_step(self, model, request, timing, client) -> kpb.ModelInferResponse:
        """Triton's sequence batcher with implicit state: the client sends `tokens` (or a
        language model's `text`), the server keeps `h`/`c` under the sequence id between
        calls; each call is a step request in the model's continuous batch."""
        engine = self.engines.get(model.name)
        if engine is None:
            raise InvalidArgument(
                "parameters.sequence_id", f"{model.name} is not a step model (no state)"
            )
        if engine.scheduler.model is not model:
            raise Unavailable(f"{model.name} was reloaded while this request began; retry")
        key, start, end = sequence_parameters(request.parameters)
        wanted = _requested(request, SEQUENCE_OUTPUTS, model.name)
        tokens = _sequence_tokens(model, request, start)
        timing.mark("input")
        store = self.sequences.get(model.name)
        if store is None:
            store = SequenceStore(idle_us(model), per_client=self.max_sequences_per_client)
            self.sequences[model.name] = store
        with engine.lease():  # a reload retires this engine only after the step
            async with store.hold(client, key, start) as entry:
                timing.mark("queue")  # the sequence's previous step went first
                if start:
                    entry.version = model.version
                elif entry.version != model.version:  # its state belongs to another version
                    store.end((client, key))
                    raise FailedPrecondition(
                        f"parameters.sequence_id: sequence {key} started on version "
                        f"{entry.version}; {model.name} now serves version {model.version}: "
                        "start it again (sequence_start)"
                    )
                seq = step_request(model, tokens, entry.state)
                reader = OutboxReader(seq.outbox)
                engine.submit(seq)
                try:
                    delta = await reader.next()  # a step request ends with its one delta
                finally:
                    engine.cancel(seq)
                if delta.error is not None:
                    raise delta.error
                timing.engine(delta.queue_time_us * 1000)
                entry.state = delta.state
                if end:
                    store.end((client, key))
        response = kpb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        for name in wanted:
            if name == "logits":
                add_output(response, "logits", delta.logits[None])  # [1, V]
            else:
                add_output(response, "greedy_text", _greedy_text(model, delta.logits))
        timing.mark("output")
        return response

    @unary
    async def ModelStatistics(self, request, context):
        """Every inference on a model counts, whatever the protocol: Classify, Generate,
        Caption, ModelInfer, ModelStreamInfer and sequence steps (`serving.metrics.statistics`).
        An empty name: every model."""
        if request.name:
            models = [self._model(request.name, request.version)]
        elif request.version:
            raise InvalidArgument("version", "needs a name; an empty name means every model")
        else:
            models = [m for _, m in sorted(self.registry.models.items())]
        return kpb.ModelStatisticsResponse(model_stats=[self._statistics(m) for m in models])

    def _statistics(self, model) -> kpb.ModelStatistics:
        data = self.statistics[model.name].snapshot()  # the engine's graph runs included

        def duration(d):
            return kpb.StatisticDuration(count=d.count, ns=d.ns)

        return kpb.ModelStatistics(
            name=model.name,
            version=model.version,
            last_inference=data.last_inference_ms,
            inference_count=data.inference_count,
            execution_count=data.execution_count,
            inference_stats=kpb.InferStatistics(
                success=duration(data.success),
                fail=duration(data.fail),
                queue=duration(data.phases["queue"]),
                compute_input=duration(data.phases["input"]),
                compute_infer=duration(data.phases["infer"]),
                compute_output=duration(data.phases["output"]),
            ),
            batch_stats=[
                kpb.InferBatchStatistics(batch_size=size, compute_infer=duration(d))
                for size, d in data.batches.items()
            ],
        )

    # Triton's model repository extension: load and unload with --model-control-mode
    # explicit (serving/dataplane/control.py).

    def _control(self, rpc: str):
        control = self.control
        if control is None or control.mode != "explicit":
            mode = control.mode if control is not None else "none"
            raise FailedPrecondition(
                f"{rpc}: model control mode is {mode!r}; explicit load and unload need "
                "--model-control-mode explicit"
            )
        if not self.accepting:
            raise Unavailable(f"{rpc}: the server is shutting down")
        return control

    @unary
    async def RepositoryModelLoad(self, request, context):
        control = self._control("RepositoryModelLoad")
        if not request.model_name:
            raise InvalidArgument("model_name", "required")
        for name in request.parameters:
            # Triton's `config` (a model configuration to load with) and `file:<path>`
            # (model files sent with the request) would load something other than the
            # repository's files: refused, never ignored
            raise Unimplemented(
                f"parameters[{name!r}]: not supported; RepositoryModelLoad loads "
                "the repository's own files (edit config.pbtxt there and load again)"
            )
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.workers, control.load, request.model_name)
        return kpb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request, context):
        control = self._control("RepositoryModelUnload")
        if not request.model_name:
            raise InvalidArgument("model_name", "required")
        loop = asyncio.get_running_loop()  # it may wait for a load in progress
        await loop.run_in_executor(self.workers, control.unload, request.model_name)
        return kpb.RepositoryModelUnloadResponse()


def _requested(request, names, model_name: str) -> list[str]:
    """The outputs the request names (each once, each one of `names`), or all of them."""
    wanted = [o.name for o in request.outputs]
    for i, name in enumerate(wanted):
        if name not in names:
            raise InvalidArgument(
                f"outputs[{i}].name", f"{name!r} is not an output of {model_name}: {list(names)}"
            )
        if name in wanted[:i]:
            raise InvalidArgument(f"outputs[{i}].name", f"{name!r} requested twice")
    return wanted or list(names)


def _shapes(request) -> dict[str, list[int]]:
    """The shapes a request declares, by input name (the first of a name given twice)."""
    shapes: dict[str, list[int]] = {}
    for tensor in request.inputs:
        shapes.setdefault(tensor.name, list(tensor.shape))
    return shapes


def input_limits(model) -> InputLimits:
    """The bounds on one ModelInfer of `model`'s graph: its config.pbtxt's
    max_batch_size over each input's batch axis (a state tensor's is the card's open
    dimension, the others' the first), and for a graph that reads token ids (a step
    graph, or a language model's prefill) its vocabulary and the prompt cap."""
    owner = getattr(model, "of", None) or model.card  # a published graph: its model's card
    state_axes = {s["input"]: list(s["shape"]).index(-1) for s in owner.get("state", [])}
    axes = {}
    for spec in model.card["inputs"]:
        if spec["name"] in state_axes:
            axes[spec["name"]] = state_axes[spec["name"]]
        elif spec["shape"] and spec["shape"][0] == -1:
            axes[spec["name"]] = 0
    return InputLimits(
        max_batch_size=model.config.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        batch_axes=axes,
        vocab_size=len(owner.get("vocab", ())),
        max_tokens=MAX_PROMPT_CHARS,
    )


def _sequence_tokens(model, request, start: bool) -> np.ndarray:
    """A sequence step's token ids: `tokens` INT64 [1, 1], or (a language model) `text`
    BYTES [1, 1], one UTF-8 string of characters in its vocabulary; a sequence's first
    text opens with the model's BOS, as Generate's prompt does."""
    given = [t.name for t in request.inputs]
    if "text" not in given:
        spec = [t for t in model.card["inputs"] if t["name"] == "tokens"]
        feeds = decode_inputs(request, spec)
        check_values(feeds, input_limits(model), model.name)  # ids in the vocabulary
        tokens = feeds["tokens"]
        if tokens.shape[0] != 1:
            raise InvalidArgument("inputs[0].shape", "a sequence steps one row at a time: [1, 1]")
        return tokens[0]
    if not hasattr(model, "encode"):
        raise InvalidArgument(
            f"inputs[{given.index('text')}].name",
            f"{model.name} takes `tokens` only; `text` is for language models",
        )
    if "tokens" in given:
        raise InvalidArgument("inputs", "send `tokens` or `text`, not both")
    (data,) = decode_inputs(request, [TEXT_INPUT])["text"].ravel()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("inputs[0].contents", f"'text' is not UTF-8 ({exc.reason})") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            "inputs[0].contents", f"'text': {len(text)} characters; at most {MAX_PROMPT_CHARS}"
        )
    ids = model.encode(text, field="inputs[0].contents")
    if start:
        ids = [model.bos, *ids]
    if not ids:
        raise InvalidArgument("inputs[0].contents", "'text' is empty; send at least a character")
    return np.asarray(ids, np.int64)


def _greedy_text(model, logits: np.ndarray) -> np.ndarray:
    """The text of the most likely next token (the token Generate picks at temperature
    0) as BYTES [1, 1]; empty for the end of the sequence (EOS)."""
    if model.never_sampled:
        logits = logits.copy()
        logits[model.never_sampled] = -np.inf
    token = int(np.argmax(logits))
    text = "" if token == model.eos else model.vocab[token]
    return np.asarray([[text.encode("utf-8")]], dtype=object)


def _sequence_key(request) -> str | None:
    """A stream request's sequence id as text (None: not a sequence step), unchecked:
    it orders the steps of one sequence; `sequences.sequence_parameters` validates."""
    if isinstance(request, Undecodable) or "sequence_id" not in request.parameters:
        return None
    value = request.parameters["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    return f"{request.model_name}/{getattr(value, kind)!r}" if kind else None


class _ByteBudget:
    """The bytes one ModelStreamInfer stream holds, used from the event loop only:
    requests read and not yet answered, then their answers until the client takes them."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.sizes: dict[asyncio.Task, int] = {}  # an answered request -> its answer's bytes
        self._freed = asyncio.Event()

    async def take(self, size: int) -> None:
        """Wait until `size` more bytes fit (at once when nothing is held)."""
        while self.used and self.used + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.used += size

    def give(self, size: int) -> None:
        self.used -= size
        self._freed.set()

    def swap(self, request_size: int, task: asyncio.Task) -> None:
        """A request was answered: its bytes go, its answer's stay until taken."""
        answer = 0 if task.cancelled() else task.result().ByteSize()
        self.sizes[task] = answer
        self.give(request_size - answer)


def add_to_server(servicer: KServeServicer, server) -> None:
    _add(servicer, server, kpb, "GRPCInferenceService")
