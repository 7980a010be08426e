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
    assert meta.name == "stepwise" and list(meta.extensions) == ["model_configuration", "sequence"]
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


def _raw(name: str, array, datatype: str):
    return (
        kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape),
        array.astype(array.dtype.newbyteorder("<")).tobytes(),
    )


def _infer(kserve, model: str, arrays: dict, **fields):
    import numpy as np

    request = kpb.ModelInferRequest(model_name=model, **fields)
    for name, array in arrays.items():
        datatype = {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
        tensor, data = _raw(name, array, datatype)
        request.inputs.append(tensor)
        request.raw_input_contents.append(data)
    return kserve.ModelInfer(request)


def _outputs(response) -> dict:
    import numpy as np

    kinds = {"FP32": np.float32, "INT64": np.int64}
    return {
        o.name: np.frombuffer(raw, kinds[o.datatype]).reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_model_infer_on_a_classifier_batch_equals_classify(kserve, client, repository):
    import numpy as np

    from serving._proto.stepwise.v1 import inference_pb2 as pb

    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    response = _infer(kserve, "lenet5", {"input": x}, id="req-7")
    assert (response.model_name, response.model_version, response.id) == ("lenet5", "1", "req-7")
    logits = _outputs(response)["logits"]
    assert logits.shape == (3, 10)
    for row, lg in zip(x, logits, strict=True):
        tensor = pb.Tensor(dtype="float32", shape=row.shape, raw_data=row.tobytes())
        got = client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor, top_k=10))
        probs = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
        for c in got.classes:
            assert c.probability == pytest.approx(probs[c.index], abs=1e-5)


def test_a_client_runs_the_recurrence_through_the_plain_step_graph(kserve, client, repository):
    """Greedy decoding with the state as ordinary tensors, one token per call, equals
    Generate at temperature 0."""
    import json

    import numpy as np

    vocab = json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    prompt = "KING.\n"
    want = "".join(r.text for r in client.generate_stream(prompt, max_tokens=20, temperature=0))
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="char_lstm"))
    shape = {t.name: list(t.shape) for t in meta.inputs}["h"]  # [-1, L, H]: batch-first
    h = c = np.zeros([1, *shape[1:]], np.float32)
    feed, got = [0, *(vocab.index(ch) for ch in prompt)], ""  # <eos> opens a document
    while len(got) < len(want):
        for token in feed:
            out = _outputs(_infer(kserve, "char_lstm", {
                "tokens": np.asarray([[token]], np.int64), "h": h, "c": c}))  # fmt: skip
            h, c = out["h_next"], out["c_next"]
        token = int(np.argmax(out["logits"][0]))
        if token == 0:
            break
        got, feed = got + vocab[token], [token]
    assert got == want


def test_model_infer_typed_contents_and_output_filtering(kserve):
    import numpy as np

    x = np.zeros((1, 1, 32, 32), np.float32)
    request = kpb.ModelInferRequest(model_name="lenet5")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="logits")
    typed = _outputs(kserve.ModelInfer(request))["logits"]
    raw = _outputs(_infer(kserve, "lenet5", {"input": x}))["logits"]
    assert np.array_equal(typed, raw)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "inputs[0].datatype"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 3), "inputs[0].shape"),
        (lambda r: r.raw_input_contents.__setitem__(0, b"\\0" * 8), "raw_input_contents[0]"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), "inputs[0].name"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "raw_input_contents"),
        (lambda r: r.outputs.add(name="probabilities"), "outputs[0].name"),
    ],
)
def test_model_infer_errors_name_the_tensor(kserve, change, field):
    import numpy as np

    request = kpb.ModelInferRequest(model_name="lenet5")
    tensor, data = _raw("input", np.zeros((1, 1, 32, 32), np.float32), "FP32")
    request.inputs.append(tensor)
    request.raw_input_contents.append(data)
    change(request)
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_model_infer_missing_input_and_unknown_model(kserve):
    import numpy as np

    with pytest.raises(grpc.RpcError) as info:
        _infer(kserve, "char_lstm", {"tokens": np.zeros((1, 1), np.int64)})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing ['h', 'c']" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        _infer(kserve, "nope", {})
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _seq_step(kserve, key, token: int, start=False, end=False, model="char_lstm"):
    import numpy as np

    request = kpb.ModelInferRequest(model_name=model)
    if isinstance(key, str):
        request.parameters["sequence_id"].string_param = key
    else:
        request.parameters["sequence_id"].uint64_param = key
    if start:
        request.parameters["sequence_start"].bool_param = True
    if end:
        request.parameters["sequence_end"].bool_param = True
    tensor, data = _raw("tokens", np.asarray([[token]], np.int64), "INT64")
    request.inputs.append(tensor)
    request.raw_input_contents.append(data)
    return _outputs(kserve.ModelInfer(request))["logits"][0]


def _greedy_by_sequence(kserve, key, vocab: list[str], prompt: str, n: int) -> str:
    import numpy as np

    feed, got, first = [0, *(vocab.index(ch) for ch in prompt)], "", True
    while len(got) < n:
        for token in feed:
            logits = _seq_step(kserve, key, token, start=first)
            first = False
        token = int(np.argmax(logits))
        if token == 0:
            break
        got, feed = got + vocab[token], [token]
    _seq_step(kserve, key, 0, end=True)
    return got


def test_server_held_sequence_state_equals_generate(kserve, client, repository):
    import json

    vocab = json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    want = "".join(r.text for r in client.generate_stream("KING.\n", max_tokens=20, temperature=0))
    assert _greedy_by_sequence(kserve, 4242, vocab, "KING.\n", len(want)) == want
    assert _greedy_by_sequence(kserve, "a-string-id", vocab, "KING.\n", len(want)) == want


def test_sequence_errors_name_the_id(kserve):
    def error(call):
        with pytest.raises(grpc.RpcError) as info:
            call()
        return info.value

    err = error(lambda: _seq_step(kserve, 999, 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "999 does not exist" in err.details()
    _seq_step(kserve, 1000, 0, start=True)
    err = error(lambda: _seq_step(kserve, 1000, 0, start=True))
    assert "1000 is already in use" in err.details()
    _seq_step(kserve, 1000, 1, end=True)
    err = error(lambda: _seq_step(kserve, 1000, 1))  # ended: gone
    assert "1000 does not exist" in err.details()
    err = error(lambda: _seq_step(kserve, 7, 0, start=True, model="lenet5"))
    assert (
        err.details().startswith("parameters.sequence_id") and "not a step model" in err.details()
    )


def test_idle_sequences_expire_and_many_clients_interleave(tmp_path, repository):
    import json
    import shutil
    import time
    from concurrent.futures import ThreadPoolExecutor

    from serving.server import ServerConfig, create_server

    root = tmp_path / "repo"
    shutil.copytree(repository / "char_lstm", root / "char_lstm")
    config = (root / "char_lstm" / "config.pbtxt").read_text()
    (root / "char_lstm" / "config.pbtxt").write_text(
        config.replace(
            "max_sequence_idle_microseconds: 60000000", "max_sequence_idle_microseconds: 1000000"
        )  # fmt: skip
    )
    vocab = json.loads((root / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    server, port = create_server(ServerConfig(root, port=0, device="cpu"))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            _seq_step(stub, 5, 0, start=True)
            time.sleep(1.3)
            with pytest.raises(grpc.RpcError) as info:
                _seq_step(stub, 5, 1)
            assert "5 expired after 1 s idle" in info.value.details()
            prompts = ["KING.\n", "QUEEN.\n", "Now ", "What "] * 2
            alone = [
                _greedy_by_sequence(stub, 100 + i, vocab, p, 15) for i, p in enumerate(prompts)
            ]
            engine = server.engines["char_lstm"]
            before = sum(n for size, n in engine.stats.batch_sizes.items() if size > 1)
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(
                    lambda ip: _greedy_by_sequence(stub, 200 + ip[0], vocab, ip[1], 15),
                    enumerate(prompts)))  # fmt: skip
            assert together == alone
            assert sum(n for size, n in engine.stats.batch_sizes.items() if size > 1) > before
    finally:
        server.stop(None)
