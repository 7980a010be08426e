"""The KServe V2 service on the stepwise port, over a real channel (issue 9, first step:
liveness, readiness, metadata, config, repository index)."""

from __future__ import annotations

import grpc
import pytest

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.inference import model_config_pb2 as mc


@pytest.fixture()
def kserve(channel):
    return kpb_grpc.GRPCInferenceServiceStub(channel)


def test_live_ready_and_model_ready(kserve, server):
    assert kserve.ServerLive(kpb.ServerLiveRequest()).live
    assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="lenet5")).ready
    assert kserve.ModelReady(kpb.ModelReadyRequest(name="lenet5", version="1")).ready
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="lenet5", version="7")).ready
    assert not kserve.ModelReady(kpb.ModelReadyRequest(name="nope")).ready


def test_server_metadata_lists_exactly_what_is_served(kserve):
    meta = kserve.ServerMetadata(kpb.ServerMetadataRequest())
    assert meta.name == "stepwise" and list(meta.extensions) == ["model_configuration"]
    with pytest.raises(grpc.RpcError) as info:  # not in the list: not served
        kserve.ModelStatistics(kpb.ModelStatisticsRequest(name="lenet5"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_model_metadata_and_config(kserve):
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="char_lstm"))
    assert (meta.name, list(meta.versions), meta.platform) == (
        "char_lstm",
        ["1"],
        "onnxruntime_onnx",
    )
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["tokens"] == ("INT64", [-1, 1]) and inputs["h"] == ("FP32", [-1, 2, 48])
    config = kserve.ModelConfig(kpb.ModelConfigRequest(name="char_lstm")).config
    assert isinstance(config, mc.ModelConfig) and config.name == "char_lstm"
    states = [(s.input_name, s.output_name) for s in config.sequence_batching.state]
    assert states == [("h", "h_next"), ("c", "c_next")]


@pytest.mark.parametrize(
    "call,request_,field",
    [
        ("ModelMetadata", kpb.ModelMetadataRequest(name="nope"), "model_name"),
        ("ModelMetadata", kpb.ModelMetadataRequest(name="lenet5", version="9"), "model_version"),
        ("ModelConfig", kpb.ModelConfigRequest(name="nope"), "model_name"),
    ],
)
def test_unknown_models_and_versions_are_not_found(kserve, call, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        getattr(kserve, call)(request_)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith(field + ":")


def test_repository_index_and_unparsable_bytes(kserve, channel):
    index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("lenet5", "1", "READY"),
        ("char_lstm", "1", "READY"),
    }
    raw = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request:")


def test_reflection_lists_it_and_shutdown_turns_server_ready_false(repository):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from serving.server import ServerConfig, create_server

    server, port = create_server(ServerConfig(repository, port=0, device="cpu"))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert "inference.GRPCInferenceService" in services
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(kpb.ServerReadyRequest()).ready
            server.enter_graceful_shutdown()
            assert not stub.ServerReady(kpb.ServerReadyRequest()).ready
            assert not stub.ModelReady(kpb.ModelReadyRequest(name="lenet5")).ready
            assert stub.ServerLive(kpb.ServerLiveRequest()).live  # still alive, draining
    finally:
        server.stop(None)
