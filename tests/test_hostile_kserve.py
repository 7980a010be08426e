"""Issue 17's reproducers on the KServe surface, over a real channel: requests that
crashed the process, grew it without bound, or were answered wrongly. Each now gets
INVALID_ARGUMENT (or UNIMPLEMENTED) naming the tensor or parameter, nothing reaches a
session or a queue, and the server goes on answering."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from polling import eventually
from test_kserve import _infer, _outputs

from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.api.limits import MAX_PROMPT_CHARS
from serving.app import create_server
from serving.batching.dynamic import BatchingConfig

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
    assert _refused(lambda: kserve.ModelInfer(request)).startswith("inputs[0].shape")
    request.inputs[0].shape[:] = [1, 2**62]  # past the prompt cap
    assert "at most 16384 per request" in _refused(lambda: kserve.ModelInfer(request))
    request.inputs[0].shape[:] = [1, 2]  # and one that fits, with 0 bytes for 16
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
    server, port = create_server(loopback_config(repository, batching=batching))
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
    server, port = create_server(loopback_config(repository, model_control_mode="explicit"))
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


# -- one client cannot take what others need --------------------------------------------


def _sequence(stub, client: str, key, token: int, start=False, end=False):
    request = kpb.ModelInferRequest(model_name="char_lstm")
    kind = "string_param" if isinstance(key, str) else "uint64_param"
    setattr(request.parameters["sequence_id"], kind, key)
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.asarray([[token]], np.int64).tobytes())
    response = stub.ModelInfer(request, metadata=[("x-client", client)], timeout=30)
    return _outputs(response)["logits"][0]


@pytest.fixture(scope="module")
def quotas(repository):
    """Clients told apart by the header a trusted proxy would set (they all share
    127.0.0.1 here); 3 live sequences per client; a 1 s stall timeout."""
    config = loopback_config(
        repository, port=0, device="cpu", client_id_header="x-client",
        max_sequences_per_client=3, stream_stall_timeout_s=1.0,
    )  # fmt: skip
    server, port = create_server(config)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, kpb_grpc.GRPCInferenceServiceStub(channel), channel
    server.stop(None)


def test_sequences_are_a_clients_own_and_counted_per_client(quotas):
    """Issue 17 item 5: one client took all 1,024 sequences; client B stepped client
    A's sequence 1000, read its continuation and ended it; "1000" was 1000."""
    _, stub, _ = quotas
    for key in (1000, 1001, 1002):
        _sequence(stub, "a", key, 3, start=True)
    details = _refused(
        lambda: _sequence(stub, "a", 1003, 3, start=True), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert "--max-sequences-per-client" in details and "holds 3" in details
    # b has its own quota and its own ids: its 1000 is not a's
    details = _refused(lambda: _sequence(stub, "b", 1000, 4, end=True))
    assert "sequence 1000 does not exist" in details
    _sequence(stub, "b", 1000, 5, start=True)
    _sequence(stub, "b", 1000, 5, end=True)
    _sequence(stub, "a", 1000, 4)  # a's 1000 lived on through b's start and end
    # the string "1000" is not the integer 1000
    assert "sequence '1000' does not exist" in _refused(lambda: _sequence(stub, "a", "1000", 4))
    for key in (1000, 1001, 1002):
        _sequence(stub, "a", key, 0, end=True)
    _sequence(stub, "a", "1000", 3, start=True, end=True)  # room again


def _big_answer(i: int) -> kpb.ModelInferRequest:
    """A 64-row step, its state left to start at zero: a request of 600 bytes whose
    answer (logits and the new state) is about 60 KiB with the tiny model."""
    request = kpb.ModelInferRequest(model_name="char_lstm", id=str(i))
    request.inputs.add(name="tokens", datatype="INT64", shape=[64, 1])
    request.raw_input_contents.append(np.full((64, 1), 3, np.int64).tobytes())
    return request


def test_a_stream_whose_client_never_reads_holds_its_byte_budget_then_is_cancelled(
    quotas, monkeypatch
):
    """Issue 17 item 3: 40 requests and no reads: the server answered 32 and kept
    every answer (one stream +900 MiB with big ones). Now it stops reading requests
    once STREAM_BUDGET_BYTES are held, and the stall watchdog ends the stream."""
    from test_slow_reader import NeverReads

    from serving.api import kserve_stream

    server, stub, _ = quotas
    answer = _outputs(_infer(stub, "char_lstm", {"tokens": np.full((64, 1), 3, np.int64)}))
    answer_bytes = sum(a.nbytes for a in answer.values())
    assert answer_bytes > 50_000
    monkeypatch.setattr(kserve_stream, "STREAM_BUDGET_BYTES", 3 * answer_bytes)
    executed = lambda: kserve_stats(stub, "char_lstm").inference_count // 64  # noqa: E731
    before, stalled = executed(), server.kserve_streams.stalled
    hostile = NeverReads(server.port)  # its flow-control windows are 0 and stay so
    try:
        path = "/inference.GRPCInferenceService/ModelStreamInfer"
        stream = hostile.call(path, [_big_answer(i) for i in range(40)], end=False)
        assert eventually(lambda: server.kserve_streams.stalled == stalled + 1, 20)
        answered = executed() - before
        assert 1 <= answered <= 6, answered  # the budget's few, not the window's 32
        assert server.kserve_streams.live == 0  # its slot is free
        hostile.open_windows([stream])  # reading again, it hears why: CANCELLED
        assert eventually(lambda: hostile.statuses.get(stream) == "1", 10), hostile.statuses
        assert executed() - before == answered  # nothing more ran for it
    finally:
        hostile.close()
    # an ordinary stream on the same server is untouched
    (got,) = list(stub.ModelStreamInfer(iter([_big_answer(99)]), timeout=30))
    assert got.infer_response.id == "99" and not got.error_message


def kserve_stats(stub, name: str):
    (stats,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=name)).model_stats
    return stats


def test_a_refused_request_is_freed_at_once_not_at_the_next_garbage_collection(kserve):
    """A refused 31 MiB ModelInfer stayed alive in the reference cycle of gRPC's abort
    (its traceback held our handlers' frames, which held the request) until Python's
    cyclic collector ran: 16 at a time for 10 rounds reached 1.9 GiB of RSS."""
    import gc

    request = kpb.ModelInferRequest(model_name="lenet5")
    x = np.zeros((65, 1, 32, 32), np.float32)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    size = request.ByteSize()

    def held() -> int:  # server-side copies: the same size, not the client's own object
        return sum(
            1
            for o in gc.get_objects()
            if type(o).__name__ == "ModelInferRequest" and o is not request
            and o.ByteSize() == size
        )  # fmt: skip

    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            _refused(lambda: kserve.ModelInfer(request))
        assert eventually(lambda: held() == 0, 2), held()
    finally:
        gc.enable()
