"""The KServe V2 service on the stepwise port, over a real channel (issue 9): liveness,
readiness, metadata, config, repository index, ModelInfer and server-held sequences,
ModelStreamInfer, statistics, and the BYTES codec. tests/test_tritonclient.py drives
the same service with the real tritonclient package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
from greedy import EOS, greedy, opening

from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.inference import model_config_pb2 as mc
from serving.core.card import TensorSpec


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
    assert meta.name == "stepwise"
    # The version is the project's, from pyproject.toml (it was a literal that could drift).
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert meta.version == re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    extensions = ["model_configuration", "model_repository", "sequence", "statistics"]
    assert list(meta.extensions) == extensions
    with pytest.raises(grpc.RpcError) as info:  # served, but not in model control mode none
        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control-mode explicit" in info.value.details()


def test_model_metadata_and_config(kserve):
    meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="char_lstm"))
    assert (meta.name, list(meta.versions), meta.platform) == (
        "char_lstm",
        ["1"],
        "onnxruntime_onnx",
    )
    # The state is implicit (Triton's sequence batcher): the metadata lists what a
    # sequence step sends and gets, as config.pbtxt does, and nothing else
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {"tokens": ("INT64", [-1, 1])}
    assert {t.name: t.datatype for t in meta.outputs} == {"logits": "FP32"}
    config = kserve.ModelConfig(kpb.ModelConfigRequest(name="char_lstm")).config
    assert isinstance(config, mc.ModelConfig) and config.name == "char_lstm"
    assert [t.name for t in config.input] == ["tokens"]
    assert [t.name for t in config.output] == ["logits"]
    states = [(s.input_name, s.output_name) for s in config.sequence_batching.state]
    assert states == [("h", "h_next"), ("c", "c_next")]
    assert [list(s.dims) for s in config.sequence_batching.state] == [[2, 48], [2, 48]]


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

    from bench.harness import loopback_config
    from serving.app import create_server

    server, port = create_server(loopback_config(repository))
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
    import math

    import numpy as np

    from serving.api.kserve_codec import deserialize_bytes

    kinds = {"FP32": np.float32, "INT64": np.int64}
    out = {}
    for o, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if o.datatype == "BYTES":
            out[o.name] = deserialize_bytes(raw, math.prod(o.shape), "", o.name).reshape(o.shape)
        else:
            out[o.name] = np.frombuffer(raw, kinds[o.datatype]).reshape(list(o.shape))
    return out


def assert_classify_agrees(client, x, logits) -> None:
    """Each row of `x` sent to Classify (lenet5, every class) gets the softmax of its
    row of `logits`: KServe's answer and stepwise's are the same model run."""
    import numpy as np

    from serving._proto.stepwise.v1 import inference_pb2 as pb

    for row, lg in zip(x, logits, strict=True):
        tensor = pb.Tensor(dtype="float32", shape=row.shape, raw_data=row.tobytes())
        got = client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor, top_k=10))
        probs = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
        for c in got.classes:
            assert c.probability == pytest.approx(probs[c.index], abs=1e-5)


def test_model_infer_on_a_classifier_batch_equals_classify(kserve, client, repository):
    import numpy as np

    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    response = _infer(kserve, "lenet5", {"input": x}, id="req-7")
    assert (response.model_name, response.model_version, response.id) == ("lenet5", "1", "req-7")
    logits = _outputs(response)["logits"]
    assert logits.shape == (3, 10)
    assert_classify_agrees(client, x, logits)


def test_a_client_runs_the_recurrence_through_the_plain_step_graph(kserve, client, repository):
    """Greedy decoding with the state as ordinary tensors, one token per call, equals
    Generate at temperature 0."""
    import json

    import numpy as np

    vocab = json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    prompt = "KING.\n"
    want = "".join(r.text for r in client.generate_stream(prompt, max_tokens=20, temperature=0))
    config = kserve.ModelConfig(kpb.ModelConfigRequest(name="char_lstm")).config
    dims = list(config.sequence_batching.state[0].dims)  # [L, H] after the batch axis
    state = {"h": np.zeros([1, *dims], np.float32)}
    state["c"] = state["h"]

    def one(token):
        feeds = {"tokens": np.asarray([[token]], np.int64), **state}
        out = _outputs(_infer(kserve, "char_lstm", feeds))
        state["h"], state["c"] = out["h_next"], out["c_next"]
        return out["logits"][0]

    assert greedy(one, vocab, prompt, len(want)) == want


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

    tokens = np.asarray([[3], [5]], np.int64)
    with pytest.raises(grpc.RpcError) as info:  # the state: all of it, or none
        _infer(kserve, "char_lstm", {"tokens": tokens, "h": np.zeros((2, 2, 48), np.float32)})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing ['c']" in info.value.details()
    # none: it starts from zeros, as Triton's implicit state does
    zeros = np.zeros((2, 2, 48), np.float32)
    alone = _outputs(_infer(kserve, "char_lstm", {"tokens": tokens}))
    explicit = _outputs(_infer(kserve, "char_lstm", {"tokens": tokens, "h": zeros, "c": zeros}))
    assert np.array_equal(alone["logits"], explicit["logits"])
    assert alone["logits"].shape[0] == 2 and np.array_equal(alone["h_next"], explicit["h_next"])
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
    step = opening(lambda token, start: _seq_step(kserve, key, token, start=start))
    got = greedy(step, vocab, prompt, n)
    _seq_step(kserve, key, EOS, end=True)
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

    from serving.app import create_server

    root = tmp_path / "repo"
    shutil.copytree(repository / "char_lstm", root / "char_lstm")
    config = (root / "char_lstm" / "config.pbtxt").read_text()
    (root / "char_lstm" / "config.pbtxt").write_text(
        config.replace(
            "max_sequence_idle_microseconds: 60000000", "max_sequence_idle_microseconds: 1000000"
        )  # fmt: skip
    )
    vocab = json.loads((root / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    server, port = create_server(loopback_config(root))
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


# -- BYTES ------------------------------------------------------------------------------


def test_bytes_codec_round_trips_and_refuses_malformed_elements():
    import numpy as np

    from serving.api.kserve_codec import decode_inputs, deserialize_bytes, serialize_bytes
    from serving.errors import InvalidArgument

    values = np.asarray([[b"", "caf\u00e9", b"\x00\xff"]], dtype=object)
    raw = serialize_bytes(values)
    assert raw == b"\0\0\0\0" + b"\5\0\0\0caf\xc3\xa9" + b"\2\0\0\0\x00\xff"
    assert list(deserialize_bytes(raw, 3, "f", "t")) == [b"", "caf\u00e9".encode(), b"\0\xff"]
    assert deserialize_bytes(b"", 0, "f", "t").shape == (0,)
    for data, count, problem in [
        (raw[:2], 1, "length prefix is cut short"),
        (b"\x09\0\0\0abc", 1, "claims 9 bytes; 3 remain"),
        (raw, 2, "bytes left after the 2 elements"),
        (raw, 4, "3 elements; the shape needs 4"),
    ]:
        with pytest.raises(InvalidArgument, match=problem):
            deserialize_bytes(data, count, "raw_input_contents[0]", "t")

    spec = [TensorSpec("text", "object", (1, -1))]
    request = kpb.ModelInferRequest()
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 3])
    request.raw_input_contents.append(raw)
    assert decode_inputs(request, spec)["text"].tolist() == [[b"", "caf\u00e9".encode(), b"\0\xff"]]
    typed = kpb.ModelInferRequest()
    typed.inputs.add(name="text", datatype="BYTES", shape=[1, 2]).contents.bytes_contents.extend(
        [b"a", b"bc"]
    )
    assert decode_inputs(typed, spec)["text"].tolist() == [[b"a", b"bc"]]
    typed.inputs[0].shape[1] = 3
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].contents: 'text': 2 values"):
        decode_inputs(typed, spec)


def test_narrow_typed_integers_are_refused_out_of_range_never_wrapped():
    from serving.api.kserve_codec import decode_inputs
    from serving.errors import InvalidArgument

    spec = [TensorSpec("x", "int8", (-1,))]
    request = kpb.ModelInferRequest()
    request.inputs.add(name="x", datatype="INT8", shape=[2]).contents.int_contents.extend([-5, 7])
    assert decode_inputs(request, spec)["x"].tolist() == [-5, 7]
    request.inputs[0].contents.int_contents[1] = 300
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].contents: 'x': values -5 to 300"):
        decode_inputs(request, spec)


def test_raw_tensors_are_read_in_place_on_a_little_endian_machine():
    """raw_input_contents become arrays over the request's own bytes (no copy) where the
    byte order already matches; the values are the same either way."""
    import sys

    import numpy as np

    from serving.api.kserve_codec import decode_inputs

    x = np.arange(6, dtype="<f4").reshape(2, 3)
    request = kpb.ModelInferRequest()
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.raw_input_contents.append(x.tobytes())
    got = decode_inputs(request, [TensorSpec("x", "float32", (-1, 3))])["x"]
    np.testing.assert_array_equal(got, x)
    assert got.dtype == np.float32
    if sys.byteorder == "little":
        assert not got.flags.owndata and not got.flags.writeable  # a view of the bytes


def _text_step(kserve, key, text: bytes, start=False, outputs=(), model="char_lstm"):
    from serving.api.kserve_codec import serialize_bytes

    request = kpb.ModelInferRequest(model_name=model)
    request.parameters["sequence_id"].string_param = key
    request.parameters["sequence_start"].bool_param = start
    request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(serialize_bytes([text]))
    for name in outputs:
        request.outputs.add(name=name)
    return _outputs(kserve.ModelInfer(request))


def test_sequence_text_in_and_greedy_text_out(kserve, repository):
    """`text` (BYTES) opens a sequence with <eos> and the prompt, as Generate does: the
    same logits as sending those tokens one at a time; `greedy_text` is the text of
    their argmax (empty for <eos>)."""
    import numpy as np

    vocab = json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    for i, token in enumerate([0, *(vocab.index(ch) for ch in "KING.\n")]):
        logits = _seq_step(kserve, 61, token, start=i == 0)
    out = _text_step(kserve, "t-61", b"KING.\n", start=True)
    assert list(out) == ["logits", "greedy_text"]  # nothing requested: both
    np.testing.assert_allclose(out["logits"][0], logits, atol=1e-4)
    assert out["greedy_text"].tolist() == [[vocab[int(np.argmax(logits))].encode()]]
    nxt = _text_step(kserve, "t-61", out["greedy_text"][0, 0], outputs=["greedy_text"])
    assert list(nxt) == ["greedy_text"] and len(nxt["greedy_text"][0, 0]) <= 1


def _seq_request(key, start=False, text=None, tokens=None, outputs=()):
    import numpy as np

    from serving.api.kserve_codec import serialize_bytes

    request = kpb.ModelInferRequest(model_name="char_lstm")
    if isinstance(key, int):
        request.parameters["sequence_id"].int64_param = key
    else:
        request.parameters["sequence_id"].string_param = key
    request.parameters["sequence_start"].bool_param = start
    if tokens is not None:
        tensor, data = _raw("tokens", np.asarray([[tokens]], np.int64), "INT64")
        request.inputs.append(tensor)
        request.raw_input_contents.append(data)
    if text is not None:
        request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
        request.raw_input_contents.append(serialize_bytes([text]))
    for name in outputs:
        request.outputs.add(name=name)
    return request


@pytest.mark.parametrize(
    "request_,field,problem",
    [
        (_seq_request("s", True, b"ab", 1), "inputs", "send `tokens` or `text`, not both"),
        (_seq_request("s", True, b"\xff"), "inputs[0].contents", "'text' is not UTF-8"),
        (_seq_request("s", True, "K\u00e9".encode()), "inputs[0].contents", "'\u00e9' are not"),
        (_seq_request("s", True, tokens=1, outputs=["h_next"]), "outputs[0].name", "'h_next'"),
        (_seq_request("s", True, tokens=1, outputs=["logits"] * 2), "outputs[1].name", "twice"),
        (_seq_request(-4, True, tokens=1), "parameters.sequence_id", "got -4; 0, negative"),
        (_seq_request("x" * 257, True, tokens=1), "parameters.sequence_id", "257 characters"),
        (_seq_request("s", True, tokens=99), "inputs[0].contents", "ids 99 to 99; char_lstm"),
    ],
)
def test_sequence_step_errors_name_the_field(kserve, request_, field, problem):
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":") and problem in info.value.details()


def test_a_failed_first_step_does_not_start_the_sequence(kserve):
    with pytest.raises(grpc.RpcError):
        kserve.ModelInfer(_seq_request("retry", True, tokens=99))  # out of range
    kserve.ModelInfer(_seq_request("retry", True, tokens=1))  # not "already in use"
    with pytest.raises(grpc.RpcError) as info:
        kserve.ModelInfer(_seq_request("retry", False, text=b""))  # nothing to feed
    assert info.value.details().startswith("inputs[0].contents: 'text' is empty")


# -- ModelStreamInfer ------------------------------------------------------------------


def test_stream_answers_every_request_in_order_and_errors_do_not_end_it(channel):
    import numpy as np

    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=lambda data: data,
        response_deserializer=kpb.ModelStreamInferResponse.FromString,
    )
    ok = kpb.ModelInferRequest(model_name="lenet5", id="a")
    tensor, data = _raw("input", np.zeros((2, 1, 32, 32), np.float32), "FP32")
    ok.inputs.append(tensor)
    ok.raw_input_contents.append(data)
    flagged = kpb.ModelInferRequest()
    flagged.CopyFrom(ok)
    flagged.id = "d"
    flagged.parameters["triton_enable_empty_final_response"].bool_param = True
    requests = [
        ok.SerializeToString(),
        b"\xff\xff\xff",  # not a ModelInferRequest
        kpb.ModelInferRequest(model_name="nope", id="c").SerializeToString(),
        flagged.SerializeToString(),
        _seq_request(71, True, tokens=0).SerializeToString(),
        _seq_request(71, False, text=b"K", outputs=["greedy_text"]).SerializeToString(),
    ]
    got = list(call(iter(requests), timeout=60))
    assert [r.error_message == "" for r in got] == [True, False, False, True, True, True]
    assert got[0].infer_response.id == "a"
    assert list(got[0].infer_response.outputs[0].shape) == [2, 10]
    assert not got[0].infer_response.parameters
    assert got[1].error_message.startswith("request: cannot parse")
    assert got[2].error_message.startswith("model_name: no model named 'nope'")
    assert got[2].infer_response.id == "c"  # an error still names its request
    assert got[3].infer_response.parameters["triton_final_response"].bool_param
    assert [o.name for o in got[5].infer_response.outputs] == ["greedy_text"]


# -- ModelStatistics -------------------------------------------------------------------


def _stats(kserve, name: str):
    (stats,) = kserve.ModelStatistics(kpb.ModelStatisticsRequest(name=name)).model_stats
    return stats


def test_statistics_count_every_protocol(kserve, client):
    """Classify, Generate and ModelInfer all count: successes, failures, inferences."""
    import numpy as np

    from serving._proto.stepwise.v1 import inference_pb2 as pb

    lenet, lstm = _stats(kserve, "lenet5"), _stats(kserve, "char_lstm")
    x = np.zeros((1, 32, 32), np.float32)
    tensor = pb.Tensor(dtype="float32", shape=x.shape, raw_data=x.tobytes())
    client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor))
    _infer(kserve, "lenet5", {"input": np.zeros((4, 1, 32, 32), np.float32)})
    list(client.generate_stream("KING.\n", max_tokens=3, temperature=0))
    with pytest.raises(grpc.RpcError):
        list(client.generate_stream("KING.\n", max_tokens=3, temperature=-1))
    after = _stats(kserve, "lenet5")
    assert after.inference_stats.success.count - lenet.inference_stats.success.count == 2
    assert after.inference_count - lenet.inference_count == 5  # 1 + a batch of 4
    assert after.execution_count - lenet.execution_count == 2
    assert after.inference_stats.compute_infer.ns > lenet.inference_stats.compute_infer.ns
    assert after.last_inference >= lenet.last_inference > 0
    now = _stats(kserve, "char_lstm")
    assert now.inference_stats.success.count - lstm.inference_stats.success.count == 1
    assert now.inference_stats.fail.count - lstm.inference_stats.fail.count == 1
    assert now.inference_stats.queue.count - lstm.inference_stats.queue.count == 1
    # The continuous batch's runs: the prefill of the prompt, and a step per token.
    assert now.execution_count - lstm.execution_count >= 3


def test_statistics_of_every_model_and_errors(kserve):
    everything = kserve.ModelStatistics(kpb.ModelStatisticsRequest()).model_stats
    assert {"lenet5", "char_lstm"} <= {(m.name) for m in everything}
    assert all(m.version == "1" for m in everything)
    for request_, code, field in [
        (kpb.ModelStatisticsRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "model_name"),
        (kpb.ModelStatisticsRequest(name="lenet5", version="2"), grpc.StatusCode.NOT_FOUND,
         "model_version"),
        (kpb.ModelStatisticsRequest(version="1"), grpc.StatusCode.INVALID_ARGUMENT, "version"),
    ]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            kserve.ModelStatistics(request_)
        assert info.value.code() == code and info.value.details().startswith(field + ":")


def test_model_infer_on_a_classifier_goes_through_its_dynamic_batcher(repository):
    """With dynamic batching on, concurrent ModelInfer requests (and Classify calls) on
    lenet5 share batches (the batcher's counter) and get exactly the logits the graph
    gives each request alone; a request's own rows may be split across batches."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from serving._proto.stepwise.v1 import inference_pb2 as pb
    from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
    from serving.app import create_server
    from serving.batching.dynamic import BatchingConfig
    from serving.core.models import load_model

    batching = BatchingConfig(max_batch_size=8, max_queue_delay_us=100_000)
    server, port = create_server(loopback_config(repository, batching=batching))
    server.start()
    lenet = load_model(repository / "lenet5" / "1", "cpu")
    inputs = [np.random.default_rng(i).random((1 + i % 3, 1, 32, 32), np.float32) for i in range(8)]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            stepwise = pb_grpc.InferenceStub(channel)

            def infer(x):
                return _outputs(_infer(stub, "lenet5", {"input": x}))["logits"]

            def classify(x):
                t = pb.Tensor(dtype="float32", shape=x[0].shape, raw_data=x[0].tobytes())
                return stepwise.Classify(pb.ClassifyRequest(model="lenet5", tensor=t), timeout=30)

            with ThreadPoolExecutor(10) as pool:
                got = list(pool.map(infer, inputs))
                both = list(pool.map(classify, inputs[:2])) + list(pool.map(infer, inputs[:2]))
        batcher = server.batchers["lenet5"]
        for x, logits in zip(inputs, got, strict=True):
            alone = np.stack([lenet.session.run(None, {"input": row[None]})[0][0] for row in x])
            assert np.array_equal(logits, alone)
        assert max(batcher.batch_sizes) > 1  # requests really ran together
        rows = sum(len(x) for x in inputs + inputs[:2]) + 2  # + the two Classify images
        assert sum(size * n for size, n in batcher.batch_sizes.items()) == rows  # all of them
        assert both[0].classes and both[3].shape == (2, 10)
        stats = server.statistics["lenet5"].snapshot()
        assert stats.inference_count == rows
    finally:
        server.stop(None)
