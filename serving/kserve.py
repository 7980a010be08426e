"""The KServe V2 (Open Inference Protocol) gRPC service, `inference.GRPCInferenceService`,
on the same port as `stepwise.v1.Inference`: the first step of issue 9.

Served so far: liveness and readiness (server and models), server and model metadata,
each model's `config.pbtxt` as Triton's `ModelConfigResponse`, the repository index,
`ModelInfer` on each model's `model.onnx` as plain tensors (a step graph's state is an
ordinary input and output), and server-held sequence state (`sequence_id`,
`sequence_start`, `sequence_end` parameters: the client sends `tokens`, gets `logits`,
and its step joins the model's continuous batch). `ModelStreamInfer`, statistics and
repository load/unload answer UNIMPLEMENTED until they land, and
`ServerMetadata.extensions` lists only what is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.inference import model_config_pb2 as mc
from serving.engine import step_request
from serving.errors import InvalidArgument, NotFound, ResourceExhausted, ServingError
from serving.model_config import DATA_TYPES, DEFAULT_SEQUENCE_IDLE_US, PLATFORM, config_for_card
from serving.repository import ModelRegistry
from serving.service import OutboxReader, streaming, unary
from serving.service import add_to_server as _add

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "stepwise"
SERVER_VERSION = "0.1.0"
# Exactly what is served, in Triton's extension names.
EXTENSIONS = ("model_configuration", "sequence")
# numpy dtype names (model.json) -> the protocol's datatypes: Triton's TYPE_* names
# without the prefix (TYPE_FP32 -> "FP32"), from the one table config.pbtxt uses.
DATATYPES = {
    name: mc.DataType.Name(value).removeprefix("TYPE_") for name, value in DATA_TYPES.items()
}


def _add_output(response: kpb.ModelInferResponse, name: str, value: np.ndarray) -> None:
    """One output tensor, its bytes little-endian in raw_output_contents."""
    value = np.ascontiguousarray(value)
    response.outputs.add(name=name, datatype=DATATYPES[value.dtype.name], shape=value.shape)
    response.raw_output_contents.append(value.astype(value.dtype.newbyteorder("<")).tobytes())


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry, workers=None, engines=None):
        self.registry = registry
        self.workers = workers  # graph runs happen here, never on the event loop
        self.engines = engines or {}  # step model name -> its continuous-batching engine
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

        return kpb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=tensors(model.card["inputs"]),
            outputs=tensors(model.card["outputs"]),
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
        return kpb.RepositoryIndexResponse(models=models)

    @unary
    async def ModelInfer(self, request, context):
        """Run the model's graph (`model.onnx`: a classifier, or a step model's step
        graph with its state as plain inputs and outputs) on the request's tensors; with
        a `sequence_id` parameter on a step model, the server holds the state."""
        model = self._model(request.model_name, request.model_version)
        if "sequence_id" in request.parameters:
            return await self._sequence_step(model, request)
        feeds = decode_inputs(request, model.card["inputs"])
        names = [t["name"] for t in model.card["outputs"]]
        wanted = [o.name for o in request.outputs] or names
        for i, name in enumerate(wanted):
            if name not in names:
                raise InvalidArgument(
                    f"outputs[{i}].name", f"{name!r} is not an output of {model.name}: {names}"
                )
        loop = asyncio.get_running_loop()
        session = model.graphs["step"] if hasattr(model, "graphs") else model.session
        try:
            values = await loop.run_in_executor(self.workers, session.run, wanted, feeds)
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
            _add_output(response, name, value)
        return response

    async def _sequence_step(self, model, request) -> kpb.ModelInferResponse:
        """Triton's sequence batcher with implicit state: the client sends `tokens`, the
        server keeps `h`/`c` under the sequence id between calls; each call is a step
        request in the model's continuous batch."""
        engine = self.engines.get(model.name)
        if engine is None:
            raise InvalidArgument(
                "parameters.sequence_id", f"{model.name} is not a step model (no state)"
            )
        key, start, end = _sequence_parameters(request.parameters)
        token_spec = [t for t in model.card["inputs"] if t["name"] == "tokens"]
        feeds = decode_inputs(request, token_spec)
        if feeds["tokens"].shape[0] != 1:
            raise InvalidArgument("inputs[0].shape", "a sequence steps one row at a time: [1, 1]")
        store = self.sequences.setdefault(model.name, SequenceStore(_idle_us(model)))
        async with store.hold(key, start) as entry:
            seq = step_request(model, feeds["tokens"][0], entry.state)
            reader = OutboxReader(seq.outbox)
            engine.submit(seq)
            try:
                delta = await reader.next()  # a step request ends with its one delta
            finally:
                engine.cancel(seq)
            if delta.error is not None:
                raise delta.error
            entry.state = delta.state
            if end:
                store.end(key)
        response = kpb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        _add_output(response, "logits", delta.logits[None])  # [1, V]
        return response

    # Not served yet (issue 9 goes on): UNIMPLEMENTED, naming what is missing.

    @streaming
    async def ModelStreamInfer(self, request_iterator, context):
        raise Unimplemented("ModelStreamInfer")
        yield  # an async generator, as the streaming RPC needs

    @unary
    async def ModelStatistics(self, request, context):
        raise Unimplemented("ModelStatistics")

    @unary
    async def RepositoryModelLoad(self, request, context):
        raise Unimplemented("RepositoryModelLoad")

    @unary
    async def RepositoryModelUnload(self, request, context):
        raise Unimplemented("RepositoryModelUnload")


# The protocol's datatypes -> (numpy dtype, the typed-contents field that carries them).
NUMPY = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, None),  # raw only
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
}
MAX_DIMS = 8


def decode_inputs(request, specs: list[dict]) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays, checked against the graph's inputs:
    every input present once, its datatype and shape, and its bytes (raw) or values
    (typed contents); raw and typed contents never mixed in one request."""
    by_name = {s["name"]: s for s in specs}
    raw = list(request.raw_input_contents)
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if raw and typed:
        raise InvalidArgument(
            "raw_input_contents", f"set, and inputs {typed} carry typed contents: use one form"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            "raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} inputs"
        )
    feeds = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"{field}.name", f"{tensor.name!r}; the inputs are {list(by_name)}"
            )
        if tensor.name in feeds:
            raise InvalidArgument(f"{field}.name", f"{tensor.name!r} given twice")
        want = DATATYPES[spec["dtype"]]
        if tensor.datatype != want:
            raise InvalidArgument(
                f"{field}.datatype", f"{tensor.name!r} is {want}, not {tensor.datatype!r}"
            )
        shape = list(tensor.shape)
        allowed = spec["shape"]
        if len(shape) != len(allowed) or any(
            d < 0 or (a != -1 and d != a) for d, a in zip(shape, allowed, strict=False)
        ):
            raise InvalidArgument(
                f"{field}.shape", f"{tensor.name!r}: got {shape}; allowed {allowed} (-1: any)"
            )
        dtype, contents_field = NUMPY[want]
        count = math.prod(shape)
        if raw:
            data = raw[i]
            need = count * np.dtype(dtype).itemsize
            if len(data) != need:
                raise InvalidArgument(
                    f"raw_input_contents[{i}]",
                    f"{tensor.name!r}: {len(data)} bytes; shape {shape} of {want} needs {need}",
                )
            array = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)
        else:
            values = getattr(tensor.contents, contents_field) if contents_field else []
            if len(values) != count:
                raise InvalidArgument(
                    f"{field}.contents",
                    f"{tensor.name!r}: {len(values)} values; shape {shape} needs {count}",
                )
            array = np.asarray(values, dtype)
        feeds[tensor.name] = array.reshape(shape)
    missing = [n for n in by_name if n not in feeds]
    if missing:
        raise InvalidArgument("inputs", f"missing {missing}; the graph needs {list(by_name)}")
    return feeds


MAX_SEQUENCES = 1024  # live server-held sequences per model; past it RESOURCE_EXHAUSTED
EXPIRED_KEPT = 4096  # expired ids remembered, so a late call hears "expired"


def _idle_us(model) -> int:
    idle = model.config.sequence_batching.max_sequence_idle_microseconds
    return idle or DEFAULT_SEQUENCE_IDLE_US


def _sequence_parameters(params) -> tuple[str, bool, bool]:
    """(the sequence id as text, sequence_start, sequence_end) from request parameters."""
    value = params["sequence_id"]
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("uint64_param", "int64_param", "string_param"):
        raise InvalidArgument("parameters.sequence_id", "must be a uint64, int64 or string")
    key = str(getattr(value, kind))
    if key in ("", "0"):
        raise InvalidArgument("parameters.sequence_id", "0 and empty are not sequence ids")
    flags = []
    for name in ("sequence_start", "sequence_end"):
        flag = params[name] if name in params else None
        if flag is not None and flag.WhichOneof("parameter_choice") != "bool_param":
            raise InvalidArgument(f"parameters.{name}", "must be a bool")
        flags.append(bool(flag and flag.bool_param))
    return key, flags[0], flags[1]


@dataclass
class _Entry:
    state: dict | None
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SequenceStore:
    """Server-held state by sequence id, for one model, used from the event loop only.
    Idle sequences expire after `idle_us`; at most MAX_SEQUENCES live at once."""

    def __init__(self, idle_us: int, clock=time.monotonic):
        self.idle_s, self.clock = idle_us / 1e6, clock
        self.live: dict[str, _Entry] = {}
        self.expired: dict[str, float] = {}

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self.live.items() if now - e.last_used > self.idle_s]:
            if not self.live[key].lock.locked():
                del self.live[key]
                self.expired[key] = now
        while len(self.expired) > EXPIRED_KEPT:
            self.expired.pop(next(iter(self.expired)))

    @contextlib.asynccontextmanager
    async def hold(self, key: str, start: bool):
        now = self.clock()
        self._sweep(now)
        entry = self.live.get(key)
        if start:
            if entry is not None:
                raise InvalidArgument(
                    "parameters.sequence_start", f"sequence {key} is already in use"
                )
            if len(self.live) >= MAX_SEQUENCES:
                raise ResourceExhausted(f"{MAX_SEQUENCES} sequences are live; end one first")
            entry = self.live[key] = _Entry(None, now)
            self.expired.pop(key, None)
        elif entry is None:
            if key in self.expired:
                raise InvalidArgument(
                    "parameters.sequence_id",
                    f"sequence {key} expired after {self.idle_s:g} s idle; start it again",
                )
            raise InvalidArgument(
                "parameters.sequence_id",
                f"sequence {key} does not exist; send sequence_start with its first step",
            )
        async with entry.lock:  # one step of a sequence at a time, in arrival order
            yield entry
            entry.last_used = self.clock()

    def end(self, key: str) -> None:
        self.live.pop(key, None)


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"

    def __init__(self, rpc: str):
        super().__init__(f"{rpc}: not served by stepwise yet; see ServerMetadata.extensions")


def add_to_server(servicer: KServeServicer, server) -> None:
    _add(servicer, server, kpb, "GRPCInferenceService")
