"""Issue 17's reproducers on the KServe surface, over a real channel: requests that
crashed the process, grew it without bound, or were answered wrongly. Each now gets
INVALID_ARGUMENT (or UNIMPLEMENTED) naming the tensor or parameter, nothing reaches a
session or a queue, and the server goes on answering."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from test_kserve import _infer, _outputs

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.batching import BatchingConfig
from serving.server import ServerConfig, create_server
from serving.service import MAX_PROMPT_CHARS

STATE = (2, 48)  # the tiny char_lstm's [layers, hidden] after its batch axis


@pytest.fixture()
def kserve(channel):
    return kpb_grpc.GRPCInferenceServiceStub(channel)


def _refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def _step(tokens, state=None):
    state = state if state is not None else np.zeros((len(tokens), *STATE), np.float32)
    return {"tokens": np.asarray(tokens, np.int64), "h": state, "c": state}


def _still_serves(kserve) -> None:
    out = _outputs(_infer(kserve, "char_lstm", {"tokens": np.asarray([[3]], np.int64)}))
    assert np.all(np.isfinite(out["logits"]))


@pytest.mark.parametrize(
    "model,feeds,tensor",
    [
        # ONNX Runtime's LSTM kernel called std::terminate on each of these
        ("char_lstm", _step(np.zeros((0, 1))), "inputs[0]"),
        ("char_lstm_prefill", _step(np.zeros((0, 4))), "inputs[0]"),
        ("char_lstm_prefill", _step(np.zeros((1, 0))), "inputs[0]"),
        ("lenet5", {"input": np.zeros((0, 1, 32, 32), np.float32)}, "inputs[0]"),
    ],
)
def test_empty_tensors_are_refused_before_any_session(kserve, model, feeds, tensor):
    details = _refused(lambda: _infer(kserve, model, feeds))
    assert details.startswith(f"{tensor}.shape") and "at least 1" in details
    _still_serves(kserve)


def test_batches_past_max_batch_size_and_prompts_past_the_cap_are_refused(kserve):
    lenet = kserve.ModelConfig(kpb.ModelConfigRequest(name="lenet5")).config.max_batch_size
    assert lenet == 64
    x = np.zeros((lenet + 1, 1, 32, 32), np.float32)
    details = _refused(lambda: _infer(kserve, "lenet5", {"input": x}))
    assert details.startswith("inputs[0].shape") and "at most max_batch_size 64" in details
    assert _outputs(_infer(kserve, "lenet5", {"input": x[:lenet]}))["logits"].shape == (64, 10)
    # the step graph's batch axis, and the state's, bound alike
    details = _refused(lambda: _infer(kserve, "char_lstm", _step(np.zeros((65, 1)))))
    assert "a batch of 65" in details
    # a prompt through the prefill graph: the text paths' cap, with the limit named
    long = np.zeros((1, MAX_PROMPT_CHARS + 1))
    details = _refused(lambda: _infer(kserve, "char_lstm_prefill", _step(long)))
    assert f"at most {MAX_PROMPT_CHARS} per request" in details
    out = _outputs(_infer(kserve, "char_lstm_prefill", _step(np.zeros((1, 300)))))
    assert out["logits"].shape[0] == 1


def test_inputs_whose_batch_dimensions_disagree_are_refused(kserve):
    feeds = _step(np.zeros((2, 1)), np.zeros((3, *STATE), np.float32))
    assert "batch dimensions differ" in _refused(lambda: _infer(kserve, "char_lstm", feeds))


@pytest.mark.parametrize("token", [-1, -84, 10**6])
@pytest.mark.parametrize("model", ["char_lstm", "char_lstm_prefill"])
def test_token_ids_outside_the_vocabulary_are_refused(kserve, repository, model, token):
    """ONNX's Gather wraps a negative index: -1 answered OK with the last token's logits."""
    vocab = len(json.loads((repository / "char_lstm/1/model.json").read_text())["vocab"])
    details = _refused(lambda: _infer(kserve, model, _step([[3], [token]])))
    assert details.startswith("inputs[0].contents") and f"0 to {vocab - 1}" in details
    _infer(kserve, model, _step([[0], [vocab - 1]]))  # both ends of the range are fine


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_state_and_images_are_refused(kserve, bad):
    state = np.zeros((1, *STATE), np.float32)
    state[0, 1, 7] = bad
    feeds = {"tokens": np.asarray([[3]], np.int64), "h": np.zeros_like(state), "c": state}
    details = _refused(lambda: _infer(kserve, "char_lstm", feeds))
    assert details.startswith("inputs[2].contents") and "'c' holds NaN" in details
    x = np.zeros((1, 1, 32, 32), np.float32)
    x[0, 0, 3, 3] = bad
    assert "'input' holds NaN" in _refused(lambda: _infer(kserve, "lenet5", {"input": x}))


def test_a_huge_dimension_beside_a_zero_is_invalid_argument_not_internal(kserve):
    """`tokens [2**62, 0]` reached numpy's reshape and answered INTERNAL."""
    request = kpb.ModelInferRequest(model_name="char_lstm_prefill")
    request.inputs.add(name="tokens", datatype="INT64", shape=[2**62, 0])
    request.raw_input_contents.append(b"")
    assert "at least 1" in _refused(lambda: kserve.ModelInfer(request))
    request.inputs[0].shape[:] = [2**62, 2]
    assert "raw_input_contents[0]" in _refused(lambda: kserve.ModelInfer(request))


def test_metadata_is_what_model_infer_takes_for_every_model(kserve):
    """A client that builds its request from ModelMetadata alone (perf_analyzer does)
    gets an answer from every model, with and without `sequence_id` on step models."""
    kinds = {"FP32": np.float32, "INT64": np.int64}
    index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models
    for entry in index:
        meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name=entry.name))
        feeds = {
            t.name: np.zeros([1 if d == -1 else d for d in t.shape], kinds[t.datatype])
            for t in meta.inputs
        }
        response = _infer(kserve, entry.name, feeds)
        assert {o.name for o in response.outputs} >= {o.name for o in meta.outputs}
        config = kserve.ModelConfig(kpb.ModelConfigRequest(name=entry.name)).config
        assert [t.name for t in config.input] == [t.name for t in meta.inputs]
        if config.HasField("sequence_batching"):
            params = {"sequence_id": kpb.InferParameter(uint64_param=77)}
            params["sequence_start"] = kpb.InferParameter(bool_param=True)
            params["sequence_end"] = kpb.InferParameter(bool_param=True)
            request = kpb.ModelInferRequest(model_name=entry.name, parameters=params)
            for name, array in feeds.items():
                request.inputs.add(name=name, datatype="INT64", shape=array.shape)
                request.raw_input_contents.append(array.tobytes())
            for output in meta.outputs:
                request.outputs.add(name=output.name)
            assert [o.name for o in kserve.ModelInfer(request).outputs] == ["logits"]


def test_a_dynamic_batcher_queues_no_row_of_a_request_it_must_refuse(repository):
    """With --max-batch-size 8: 0 rows answered INTERNAL (np.stack of nothing) and
    2,000 rows queued 256 of them, ran them for nothing, then said "retry later"."""
    batching = BatchingConfig(max_batch_size=8)
    server, port = create_server(ServerConfig(repository, port=0, device="cpu", batching=batching))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            batcher = server.batchers["lenet5"]
            for rows in (0, 65, 2000):
                x = np.zeros((rows, 1, 32, 32), np.float32)
                _refused(lambda x=x: _infer(stub, "lenet5", {"input": x}))
            assert not batcher.batch_sizes  # not one row ran
            out = _outputs(_infer(stub, "lenet5", {"input": np.zeros((20, 1, 32, 32), np.float32)}))
            assert out["logits"].shape == (20, 10) and sum(batcher.batch_sizes.elements()) >= 3
    finally:
        server.stop(None)


def test_repository_load_refuses_config_and_files_it_would_ignore(repository):
    server, port = create_server(
        ServerConfig(repository, port=0, device="cpu", model_control_mode="explicit")
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            for name, param in [
                ("config", kpb.ModelRepositoryParameter(string_param='{"max_batch_size": 2}')),
                ("file:1/model.onnx", kpb.ModelRepositoryParameter(bytes_param=b"onnx")),
            ]:
                request = kpb.RepositoryModelLoadRequest(
                    model_name="lenet5", parameters={name: param}
                )
                details = _refused(
                    lambda r=request: stub.RepositoryModelLoad(r), grpc.StatusCode.UNIMPLEMENTED
                )
                assert details.startswith(f"parameters[{name!r}]")
            stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    finally:
        server.stop(None)
