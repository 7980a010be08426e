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
import logging
import threading

import numpy as np
from google.protobuf.message import DecodeError

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
    sequence_parameters,
)
from serving.api.kserve_stream import stream_answers
from serving.api.limits import MAX_PROMPT_CHARS
from serving.api.status import STALLED, Undecodable, add_to_server, status_of, streaming, unary
from serving.api.streams import StreamSlots
from serving.core.card import TensorSpec
from serving.core.model_config import DEFAULT_MAX_BATCH_SIZE, PLATFORM, config_for_card
from serving.dataplane.plane import DataPlane
from serving.errors import Cancelled, InvalidArgument, Unimplemented

log = logging.getLogger(__name__)

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
# A language model's sequence step may send its input as text: one UTF-8 string.
TEXT_INPUT = TensorSpec("text", "object", (1, 1))
SEQUENCE_OUTPUTS = ("logits", "greedy_text")


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, streams: StreamSlots, identify=None, peers=None):
        """`peers()`: the other frontends' serialized ModelStatisticsResponses, when this
        is one of several (`serving.remote.peers`); their counts are added to ours."""
        self.plane, self.peers = plane, peers
        # ModelStreamInfer streams hold slots of their own (an idle stream is normal for
        # a KServe client, and must not take Generate's), with the same stall watchdog
        self.streams = streams
        self.identify = identify or client_identity  # quota key: context -> client

    @unary
    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self.plane.ready)

    @unary
    async def ModelReady(self, request, context):
        return kpb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @unary
    async def ServerMetadata(self, request, context):
        return kpb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    @unary
    async def ModelMetadata(self, request, context):
        model = self.plane.model_version(request.name, request.version)

        def tensors(specs):
            return [
                kpb.ModelMetadataResponse.TensorMetadata(
                    name=s.name, datatype=DATATYPES[s.dtype], shape=s.shape
                )
                for s in specs
            ]

        # A step model's state is implicit, as in Triton's sequence batcher: the metadata
        # lists what a sequence step takes and gives (what perf_analyzer sends and asks
        # for); explicit state in a request without `sequence_id` is still accepted.
        card = model.card
        return kpb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=tensors(card.visible(card.inputs)),
            outputs=tensors(card.visible(card.outputs)),
        )

    @unary
    async def ModelConfig(self, request, context):
        model = self.plane.model_version(request.name, request.version)
        config = model.config
        if not config.input:  # no config.pbtxt: what export would have written
            config = config_for_card(model.card)
        return kpb.ModelConfigResponse(config=config)

    @unary
    async def RepositoryIndex(self, request, context):
        models = [
            kpb.RepositoryIndexResponse.ModelIndex(name=n, version=m.version, state="READY")
            for n, m in sorted(self.plane.registry.models.items())
        ]
        if not request.ready:  # models that failed to load, with the reason
            models += [
                kpb.RepositoryIndexResponse.ModelIndex(name=n, state="UNAVAILABLE", reason=r)
                for n, r in sorted(self.plane.registry.failed.items())
            ]
            models += [  # a version that failed while an older one serves
                kpb.RepositoryIndexResponse.ModelIndex(
                    name=n, version=v, state="UNAVAILABLE", reason=r
                )
                for (n, v), r in sorted(self.plane.registry.failed_versions.items())
                if n not in self.plane.registry.failed
            ]
        return kpb.RepositoryIndexResponse(models=models)

    @unary
    async def ModelInfer(self, request, context):
        return await self._infer(request, lambda: self.identify(context))

    @streaming
    async def ModelStreamInfer(self, request_iterator, context):
        """Each request answered in request order by a `ModelStreamInferResponse`: its
        `infer_response`, or its `error_message` (the stream goes on); the window, the
        byte budget and the ordering of a sequence's steps are `kserve_stream`'s. The
        stream holds a slot (`serving.api.streams`) and is cancelled when its client
        takes no answer for the stall timeout."""
        client = self.identify(context)
        loop, stalled, drop = asyncio.get_running_loop(), threading.Event(), []

        def cancel():  # the watchdog's thread: free what the stream holds now
            stalled.set()
            loop.call_soon_threadsafe(lambda: [f() for f in drop])

        answer = lambda request: self._stream_answer(request, client)  # noqa: E731
        answers = stream_answers(request_iterator, answer, drop)
        try:
            async with contextlib.aclosing(self.streams.run(answers, client, cancel)) as held:
                async for response in held:
                    if stalled.is_set():
                        break
                    yield response
        finally:
            await answers.aclose()
        if stalled.is_set():  # told when its client reads again (serving.api.status.STALLED)
            raise Cancelled(STALLED)

    async def _stream_answer(self, request, client: str):
        """One stream request's answer; an error becomes its `error_message`."""
        try:
            if isinstance(request, Undecodable):
                request.check()
            response = await self._infer(request, lambda: client)
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
        model = self.plane.model_version(request.model_name, request.model_version)
        with self.plane.timed(model) as timing:
            response = kpb.ModelInferResponse(
                model_name=model.name, model_version=model.version, id=request.id
            )
            if "sequence_id" in request.parameters:
                self.plane.sequence_deployment(model)  # a step model, still served
                key, start, end = sequence_parameters(request.parameters)
                wanted = _requested(request, SEQUENCE_OUTPUTS, model.name)
                tokens = _sequence_tokens(model, request, start)
                timing.mark("input")
                logits = await self.plane.step(model, client(), key, tokens, start, end, timing)
                for name in wanted:
                    if name == "logits":
                        add_output(response, "logits", logits[None])  # [1, V]
                    else:
                        add_output(response, "greedy_text", _greedy_text(model, logits))
                timing.mark("output")
                return response
            state = [s.input for s in model.card.state]
            limits = input_limits(model)
            check_limits(_shapes(request), limits, model.name)  # before the bytes are copied
            feeds = decode_inputs(request, model.card.inputs, optional=state)
            check_values(feeds, limits, model.name)
            first = next(iter(feeds.values()), None)
            timing.count = int(first.shape[0]) if first is not None and first.ndim else 1
            wanted = _requested(request, [t.name for t in model.card.outputs], model.name)
            timing.mark("input")
            values = await self.plane.infer(model, feeds, wanted, timing)
            for name, value in values.items():
                add_output(response, name, value)
            timing.mark("output")
            return response

    @unary
    async def ModelStatistics(self, request, context):
        """Every inference on a model counts, whatever the protocol: Classify, Generate,
        Caption, ModelInfer, ModelStreamInfer and sequence steps (`serving.metrics.statistics`).
        An empty name: every model."""
        if request.name:
            models = [self.plane.model_version(request.name, request.version)]
        elif request.version:
            raise InvalidArgument("version", "needs a name; an empty name means every model")
        else:
            models = self.plane.models()
        response = self._statistics_of(models)
        if self.peers is not None:  # one of several frontends: theirs count too
            for data in await self.plane.blocking(self.peers):
                try:
                    theirs = kpb.ModelStatisticsResponse.FromString(data)
                except DecodeError:
                    log.warning("statistics: a frontend's answer did not parse; left out")
                    continue
                add_statistics(response, theirs)
        return response

    def local_statistics(self) -> bytes:
        """This process's own counts of every model, serialized (for the other frontends)."""
        return self._statistics_of(self.plane.models()).SerializeToString()

    def _statistics_of(self, models) -> kpb.ModelStatisticsResponse:
        return kpb.ModelStatisticsResponse(model_stats=[self._statistics(m) for m in models])

    def _statistics(self, model) -> kpb.ModelStatistics:
        data = self.plane.statistics[model.name].snapshot()  # the engine's graph runs included

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

    @unary
    async def RepositoryModelLoad(self, request, context):
        self.plane.check_control("RepositoryModelLoad")  # refused first, whatever the request
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
        await self.plane.load(request.model_name)
        return kpb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(self, request, context):
        self.plane.check_control("RepositoryModelUnload")
        if not request.model_name:
            raise InvalidArgument("model_name", "required")
        await self.plane.unload(request.model_name)
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
    state_axes = {s.input: s.batch_axis for s in owner.state}
    axes = {}
    for spec in model.card.inputs:
        if spec.name in state_axes:
            axes[spec.name] = state_axes[spec.name]
        elif spec.shape and spec.shape[0] == -1:
            axes[spec.name] = 0
    return InputLimits(
        max_batch_size=model.config.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        batch_axes=axes,
        vocab_size=len(owner.vocab),
        max_tokens=MAX_PROMPT_CHARS,
    )


def _sequence_tokens(model, request, start: bool) -> np.ndarray:
    """A sequence step's token ids: `tokens` INT64 [1, 1], or (a language model) `text`
    BYTES [1, 1], one UTF-8 string of characters in its vocabulary; a sequence's first
    text opens with the model's BOS, as Generate's prompt does."""
    given = [t.name for t in request.inputs]
    if "text" not in given:
        spec = [t for t in model.card.inputs if t.name == "tokens"]
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


def add(servicer: KServeServicer, server) -> None:
    add_to_server(servicer, server, kpb, "GRPCInferenceService")


def add_statistics(total: kpb.ModelStatisticsResponse, other: kpb.ModelStatisticsResponse):
    """Add `other`'s counts to `total`'s, model by model (name and version); models only
    `other` has are left out (this process does not serve them)."""
    theirs = {(m.name, m.version): m for m in other.model_stats}
    for mine in total.model_stats:
        m = theirs.get((mine.name, mine.version))
        if m is None:
            continue
        mine.last_inference = max(mine.last_inference, m.last_inference)
        mine.inference_count += m.inference_count
        mine.execution_count += m.execution_count
        for field in ("success", "fail", "queue", "compute_input", "compute_infer",
                      "compute_output"):  # fmt: skip
            _add(getattr(mine.inference_stats, field), getattr(m.inference_stats, field))
        sizes = {b.batch_size: b for b in mine.batch_stats}
        for batch in m.batch_stats:
            if batch.batch_size not in sizes:
                sizes[batch.batch_size] = mine.batch_stats.add(batch_size=batch.batch_size)
            for field in ("compute_input", "compute_infer", "compute_output"):
                _add(getattr(sizes[batch.batch_size], field), getattr(batch, field))


def _add(total, other) -> None:
    total.count += other.count
    total.ns += other.ns
