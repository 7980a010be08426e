"""The KServe V2 (Open Inference Protocol) gRPC service, `inference.GRPCInferenceService`,
on the same port as `stepwise.v1.Inference`: the first step of issue 9.

Served so far: liveness and readiness (server and models), server and model metadata,
each model's `config.pbtxt` as Triton's `ModelConfigResponse`, and the repository
index. Inference (`ModelInfer`, `ModelStreamInfer`), statistics and repository
load/unload answer UNIMPLEMENTED until they land, and `ServerMetadata.extensions`
lists only what is served.
"""

from __future__ import annotations

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.errors import NotFound, ServingError
from serving.model_config import PLATFORM, config_for_card
from serving.repository import ModelRegistry
from serving.service import add_to_server as _add
from serving.service import streaming, unary

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "stepwise"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_configuration",)  # exactly what is served (Triton's extension names)
# numpy dtype names (model.json) -> the protocol's datatypes.
DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, registry: ModelRegistry):
        self.registry = registry
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

    # Not served yet (issue 9 goes on): UNIMPLEMENTED, naming what is missing.
    @unary
    async def ModelInfer(self, request, context):
        raise Unimplemented("ModelInfer")

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


class Unimplemented(ServingError):
    code = "UNIMPLEMENTED"

    def __init__(self, rpc: str):
        super().__init__(f"{rpc}: not served by stepwise yet; see ServerMetadata.extensions")


def add_to_server(servicer: KServeServicer, server) -> None:
    _add(servicer, server, kpb, "GRPCInferenceService")
