"""Model control while serving (serving/reload.py): poll mode picks up new versions
beside the old (streams on the old finish there), survives a broken version and
follows models coming and going; explicit mode loads and unloads through KServe's
repository RPCs."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest

from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.client import StepwiseClient
from serving.server import ServerConfig, create_server


def _eventually(predicate, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture()
def repo(tmp_path, repository):
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy)
    return copy


@pytest.fixture()
def serve(repo):
    started = []

    def start(mode: str):
        config = ServerConfig(
            repo, port=0, device="cpu", model_control_mode=mode, repository_poll_secs=0.1
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


def _versions(client) -> dict[str, str]:
    return {m.name: m.version for m in client.list_models()}


def _ready(kserve, name, version) -> bool:
    return kserve.ModelReady(kpb.ModelReadyRequest(name=name, version=version)).ready


def test_a_new_version_serves_while_streams_on_the_old_finish_there(serve, repo):
    server, client, kserve = serve("poll")
    old = server.registry.models["char_lstm"]
    old_engine = server.engines["char_lstm"]
    run = old.run

    def slow_run(*args):  # the old version at 2 ms a step: its stream outlives the reload
        time.sleep(0.002)
        return run(*args)

    old.run = slow_run
    stream = client.generate_stream("KING.\n", max_tokens=800, min_tokens=800, seed=7)
    first = next(stream)
    shutil.copytree(repo / "char_lstm" / "1", repo / "char_lstm" / "2")
    assert _eventually(lambda: _versions(client).get("char_lstm") == "2")
    assert _ready(kserve, "char_lstm", "2") and not _ready(kserve, "char_lstm", "1")
    assert old_engine.scheduler.has_work()  # the old stream is still running on v1
    rest = list(stream)
    assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 800
    text = first.text + "".join(r.text for r in rest)
    new_engine = server.engines["char_lstm"]
    assert new_engine is not old_engine and new_engine.scheduler.model.version == "2"
    # v2 is the same export: the same seed gives the same text, now on the new engine
    again = "".join(client.generate("KING.\n", max_tokens=800, min_tokens=800, seed=7))
    assert again == text and new_engine.stats.leaves >= 1
    assert _eventually(lambda: old_engine._stopped)  # retired once its stream was done


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
    shutil.copytree(repo / "lenet5" / "1", repo / "lenet5" / ".staging")
    shutil.rmtree(broken)
    (repo / "lenet5" / ".staging").rename(broken)
    assert _eventually(lambda: _versions(client)["lenet5"] == "2")
    assert ("lenet5", "2") not in server.registry.failed_versions


def test_poll_follows_models_coming_and_going(serve, repo):
    server, client, kserve = serve("poll")
    shutil.rmtree(repo / "lenet5")
    assert _eventually(lambda: "lenet5" not in _versions(client))
    with pytest.raises(grpc.RpcError) as info:
        client.classify(b"x", model="lenet5")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    shutil.copytree(repo / "char_lstm", repo / "poet")  # a new model, under a new name
    card = repo / "poet" / "1" / "model.json"
    card.write_text(card.read_text().replace('"name": "char_lstm"', '"name": "poet"'))
    (repo / "poet" / "config.pbtxt").unlink()  # its config.pbtxt names char_lstm
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
    shutil.copytree(repo / "lenet5" / "1", repo / "lenet5" / "2")
    time.sleep(0.3)
    assert _versions(client)["lenet5"] == "1"
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="lenet5"))
    assert _versions(client)["lenet5"] == "2"
