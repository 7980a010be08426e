"""Model control while serving (serving/dataplane/control.py): poll mode picks up new versions
beside the old (streams on the old finish there), survives a broken version and
follows models coming and going; explicit mode loads and unloads through KServe's
repository RPCs."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
from polling import eventually

from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.app import create_server
from serving.client import StepwiseClient


def _eventually(predicate, timeout: float = 20.0) -> bool:  # a poll scan and a load
    return eventually(predicate, timeout)


@pytest.fixture()
def repo(tmp_path, repository):
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy


@pytest.fixture()
def serve(repo):
    started = []

    def start(mode: str, **options):
        options.setdefault("device", "cpu")
        config = loopback_config(
            repo, port=0, model_control_mode=mode, repository_poll_secs=0.1, **options
        )
        server, port = create_server(config)
        server.start()
        client = StepwiseClient(f"127.0.0.1:{port}", timeout=30)
        started.append((server, client))
        return server, client, kpb_grpc.GRPCInferenceServiceStub(client.channel)

    yield start
    for server, client in started:
        client.close()
        server.stop(None)


def _publish(source, target) -> None:
    """Copy a version or model directory into place as export does: complete, then
    renamed, so no scan sees half of it."""
    staging = target.parent / f".staging-{target.name}"
    shutil.copytree(source, staging)
    staging.rename(target)


def _versions(client) -> dict[str, str]:
    return {m.name: m.version for m in client.list_models()}


def _ready(kserve, name, version) -> bool:
    return kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=version)).ready


def test_a_new_version_serves_while_streams_on_the_old_finish_there(serve, repo):
    server, client, kserve = serve("poll")
    old = server.registry.models["char_lstm"]
    old_engine = server.engines["char_lstm"]
    run = old.run

    def slow_run(*args):  # the old version at 5 ms a step: its stream outlives the reload
        time.sleep(0.005)
        return run(*args)

    old.run = slow_run
    stream = client.generate_stream("KING.\n", max_tokens=800, min_tokens=800, seed=7)
    first = next(stream)
    _publish(repo / "char_lstm" / "1", repo / "char_lstm" / "2")
    assert _eventually(lambda: _versions(client).get("char_lstm") == "2")
    assert _ready(kserve, "char_lstm", "2") and not _ready(kserve, "char_lstm", "1")
    assert old_engine.scheduler.has_work()  # the old stream is still running on v1
    rest = list(stream)
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 800
    text = first.text + "".join(r.text for r in rest)
    new_engine = server.engines["char_lstm"]
    assert new_engine is not old_engine and new_engine.model.version == "2"
    # v2 is the same export: the same seed gives the same text, now on the new engine
    again = "".join(client.generate("KING.\n", max_tokens=800, min_tokens=800, seed=7))
    assert again == text and new_engine.stats.leaves >= 1
    assert _eventually(lambda: old_engine.closed)  # retired once its stream was done


def test_a_broken_version_leaves_the_old_serving_and_says_why(serve, repo):
    server, client, kserve = serve("poll")
    broken = repo / "lenet5" / "2"
    broken.mkdir()
    shutil.copy(repo / "lenet5" / "1" / "model.json", broken / "model.json")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    assert _eventually(lambda: ("lenet5", "2") in server.registry.failed_versions)
    assert _versions(client)["lenet5"] == "1"
    assert _ready(kserve, "lenet5", "1") and not _ready(kserve, "lenet5", "2")
    index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models
    failed = [m for m in index if m.name == "lenet5" and m.version == "2"]
    assert failed and failed[0].state == "UNAVAILABLE" and "lenet5" in failed[0].reason
    ready_only = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models
    assert all(m.state == "READY" for m in ready_only)
    assert client.list_models()  # and it serves
    # A fixed version 2 (written as export does: a complete directory renamed into place)
    shutil.rmtree(broken)
    _publish(repo / "lenet5" / "1", broken)
    assert _eventually(lambda: _versions(client)["lenet5"] == "2")
    assert ("lenet5", "2") not in server.registry.failed_versions


def test_poll_follows_models_coming_and_going(serve, repo):
    server, client, kserve = serve("poll")
    shutil.rmtree(repo / "lenet5")
    assert _eventually(lambda: "lenet5" not in _versions(client))
    with pytest.raises(grpc.RpcError) as info:
        client.classify(b"x", model="lenet5")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    staging = repo / ".staging-poet"  # a new model, under a new name
    shutil.copytree(repo / "char_lstm", staging)
    card = staging / "1" / "model.json"
    card.write_text(card.read_text().replace('"name": "char_lstm"', '"name": "poet"'))
    (staging / "config.pbtxt").unlink()  # its config.pbtxt names char_lstm
    staging.rename(repo / "poet")
    assert _eventually(lambda: "poet" in _versions(client))
    assert "".join(client.generate("KING.\n", model="poet", max_tokens=5, seed=1))


def test_explicit_mode_loads_and_unloads_through_kserve(serve, repo):
    server, client, kserve = serve("explicit")
    kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name="lenet5"))
    assert "lenet5" not in _versions(client)
    assert not _ready(kserve, "lenet5", "")
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    assert _versions(client)["lenet5"] == "1" and _ready(kserve, "lenet5", "1")
    for call, request_ in (
        (kserve.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name="nope")),
        (kserve.RepositoryModelUnload, kpb.RepositoryModelUnloadRequest(model_name="nope")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request_)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
    (repo / "broken" / "1").mkdir(parents=True)
    shutil.copy(repo / "lenet5" / "1" / "model.json", repo / "broken" / "1" / "model.json")
    with pytest.raises(grpc.RpcError) as info:
        kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="broken"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "broken version 1 failed to load" in info.value.details()
    index = {m.name: m for m in kserve.RepositoryIndex(kpb.RepositoryIndexRequest()).models}
    assert index["broken"].state == "UNAVAILABLE" and index["lenet5"].state == "READY"
    time.sleep(0.3)  # explicit mode does not poll: a new version waits for a load
    _publish(repo / "lenet5" / "1", repo / "lenet5" / "2")
    time.sleep(0.3)
    assert _versions(client)["lenet5"] == "1"
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    assert _versions(client)["lenet5"] == "2"


def test_a_retired_engine_waits_for_the_requests_that_picked_it(serve, repo):
    """A request that chose the old engine and has not submitted yet (decoding its
    input on a worker) holds a lease: the reload closes the old engine only after it."""
    from serving.engine import text_request
    from serving.engine.sampler import SamplingParams

    server, client, kserve = serve("poll")
    old_model, old_engine = server.registry.models["char_lstm"], server.engines["char_lstm"]
    with old_engine.lease():
        _publish(repo / "char_lstm" / "1", repo / "char_lstm" / "2")
        assert _eventually(lambda: server.engines["char_lstm"] is not old_engine)
        time.sleep(0.3)
        assert not old_engine.closed and old_engine.busy()  # still ours
        seq = text_request(old_model, "KING.\n", 5, SamplingParams(seed=3))
        old_engine.submit(seq)  # the late submit works, on the old version
        assert _eventually(lambda: seq.status.name == "FINISHED")
        assert seq.outbox.take(timeout=0).finish_reason == "length"
    assert _eventually(lambda: old_engine.closed)  # retired once the lease is given back


def test_health_follows_loads_and_sequences_do_not_cross_versions(serve, repo):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, client, kserve = serve("explicit")
    health = health_pb2_grpc.HealthStub(client.channel)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def step(start=False, sequence_id=41):
        request = kpb.ModelInferRequest(model_name="char_lstm")
        request.parameters["sequence_id"].int64_param = sequence_id
        request.parameters["sequence_start"].bool_param = start
        tokens = request.inputs.add(name="tokens", datatype="INT64", shape=[1, 1])
        tokens.contents.int64_contents.append(5)
        return kserve.ModelInfer(request)

    step(start=True)
    step()
    _publish(repo / "char_lstm" / "1", repo / "char_lstm" / "2")
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="char_lstm"))
    with pytest.raises(grpc.RpcError) as info:  # its state was computed by version 1
        step()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "started on version 1" in info.value.details() and "version 2" in info.value.details()
    step(start=True)  # the same id starts again, on version 2
    assert step().model_version == "2"
    names = list(server.registry.models)
    for name in names:
        kserve.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=name))
    assert _eventually(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    assert _eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 5)


def test_a_reloaded_version_keeps_the_servers_session_options(serve, repo):
    server, client, _ = serve("poll", intra_op_threads=1)
    assert server.registry.models["lenet5"].session.get_session_options().intra_op_num_threads == 1
    _publish(repo / "lenet5" / "1", repo / "lenet5" / "2")
    assert _eventually(lambda: _versions(client).get("lenet5") == "2")
    new = server.registry.models["lenet5"]
    assert new.version == "2" and new.session.get_session_options().intra_op_num_threads == 1


def test_device_auto_settles_on_the_cpu_once_per_server(serve, repo, caplog):
    """One session factory per server: a reload reuses the one the first load settled
    (before, reload made its own, so `--device auto` tried CUDA and warned again)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="serving.core.runtime"):
        server, client, _ = serve("poll", device="auto")
        first = [r for r in caplog.records if "CUDA is unavailable" in r.getMessage()]
        if not first:
            pytest.skip("CUDA loads here: device auto does not fall back")
        _publish(repo / "lenet5" / "1", repo / "lenet5" / "2")
        assert _eventually(lambda: _versions(client).get("lenet5") == "2")
    warned = [r for r in caplog.records if "CUDA is unavailable" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]
    assert server.registry.models["lenet5"].provider == "CPUExecutionProvider"
