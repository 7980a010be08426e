"""The step models' engines in a process of their own (`--engine-process on`, issue 20
item 4), over a real channel: the same streams as in one process (seeded, batched,
stop strings, server-held sequences), cancellation and deadlines free the row in the
engine process, counters and metrics come back, and a crash of the engine process ends
live streams UNAVAILABLE, turns health NOT_SERVING, and is followed by a restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import eventually
from test_kserve import _greedy_by_sequence

from bench import harness
from bench.harness import loopback_config
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving.app import create_server
from serving.client import StepwiseClient

REQUESTS = [  # Generate's options: sampled, greedy, stop strings, logprobs, penalties
    dict(prompt="KING.\n", max_tokens=120, temperature=0.8, seed=7),
    dict(prompt="KING.\nNow is the ", max_tokens=40, temperature=0, seed=2),
    dict(prompt="KING.\n", max_tokens=200, temperature=0.9, seed=3, stop=["\n\n", "the"]),
    dict(prompt="To be", max_tokens=30, temperature=0.7, seed=11, logprobs=3),
    dict(prompt="KING.\n", max_tokens=60, temperature=1.0, seed=5, repetition_penalty=1.3,
         min_tokens=20),
]  # fmt: skip


POLL = dict(model_control_mode="poll", repository_poll_secs=0.1)  # reloads within a test


@contextlib.contextmanager
def _served(root, **options):
    """A started in-process server over `root` with its engines in an engine process:
    (server, target); stopped after."""
    server, port = create_server(loopback_config(root, engine_process=True, **options))
    server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(30)


def _copy(tmp_path, repository):
    """A repository of this test's own, to change on disk."""
    root = tmp_path / "repo"
    shutil.copytree(repository, root)
    return root


@pytest.fixture(scope="module")
def remote(repository):
    with _served(repository) as (server, target):
        yield server, target
    assert server.link.process.poll() == 0  # it exited on its own, asked to stop


def _responses(target: str, options: dict) -> list[tuple]:
    with StepwiseClient(target, timeout=30) as client:
        return [
            (r.text, r.finish_reason, r.completion_tokens, r.seed,
             [(t.token, round(t.logprob, 5)) for t in r.logprobs])
            for r in client.generate_stream(**{"model": "char_lstm", **options})
        ]  # fmt: skip


def _text(responses: list[tuple]) -> tuple:
    return "".join(r[0] for r in responses), responses[-1][1:4]


def test_streams_equal_the_single_process_server_alone_and_batched(remote, target):
    want = [_text(_responses(target, options)) for options in REQUESTS]
    assert [_text(_responses(remote[1], options)) for options in REQUESTS] == want
    got: list = [None] * len(REQUESTS)  # now all at once, sharing the engine's batch

    def run(i):
        got[i] = _text(_responses(remote[1], REQUESTS[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    # the logprobs of each token, too (however the tokens were grouped into messages)
    assert [t for r in _responses(remote[1], REQUESTS[3]) for t in r[4]] == [
        t for r in _responses(target, REQUESTS[3]) for t in r[4]
    ]


def test_counters_come_back_with_the_stream_s_end(remote):
    server, target = remote
    stats = server.statistics["char_lstm"].engine
    before, iterations = stats.finish_reasons["length"], stats.iterations
    responses = _responses(target, dict(prompt="KING.\n", max_tokens=50, seed=1, min_tokens=50))
    assert responses[-1][1] == "length"
    # the engine process's report came with the stream's end (tests/test_metrics.py
    # scrapes the metrics of both layouts)
    assert stats.finish_reasons["length"] == before + 1 and stats.iterations >= iterations + 50
    assert server.engines["char_lstm"].occupancy() == (0, 0)


def test_cancel_and_deadline_free_the_row_in_the_engine_process(remote):
    server, target = remote
    stats = server.statistics["char_lstm"].engine
    cancelled = stats.finish_reasons["cancelled"]
    with StepwiseClient(target, timeout=30) as client:
        call = client.generate_stream(
            model="char_lstm", prompt="KING.\n", max_tokens=4096, min_tokens=4096,
            stream_interval_ms=0,
        )  # fmt: skip
        next(call)
        call.cancel()
    eventually(lambda: stats.finish_reasons["cancelled"] == cancelled + 1, timeout=10)
    eventually(lambda: server.engines["char_lstm"].occupancy() == (0, 0), timeout=10)
    deadlines = stats.finish_reasons["deadline"] + stats.finish_reasons["cancelled"]
    with StepwiseClient(target, timeout=0.2) as client, pytest.raises(grpc.RpcError) as info:
        for _ in client.generate_stream(
            model="char_lstm", prompt="KING.\n", max_tokens=4096, min_tokens=4096
        ):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    eventually(
        lambda: stats.finish_reasons["deadline"] + stats.finish_reasons["cancelled"] > deadlines,
        timeout=10,
    )
    eventually(lambda: server.engines["char_lstm"].occupancy() == (0, 0), timeout=10)


def test_server_held_sequences_step_in_the_engine_process(remote, repository):
    import json

    vocab = json.loads((repository / "char_lstm" / "1" / "model.json").read_text())["vocab"]
    with grpc.insecure_channel(remote[1]) as channel:
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        with StepwiseClient(remote[1], timeout=30) as client:
            want = "".join(
                r.text for r in client.generate_stream("KING.\n", max_tokens=20, temperature=0)
            )
        assert _greedy_by_sequence(kserve, 77, vocab, "KING.\n", len(want)) == want


def _health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_crashed_engine_process_ends_streams_unavailable_and_is_restarted(repository):
    with _served(repository) as (server, target):
        want = _text(_responses(target, REQUESTS[0]))
        pid = server.link.process.pid
        with grpc.insecure_channel(target) as channel, StepwiseClient(target, timeout=30) as c:
            assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
            call = c.generate_stream(
                model="char_lstm", prompt="KING.\n", max_tokens=4096, min_tokens=4096,
                stream_interval_ms=0,
            )  # fmt: skip
            first = next(call).text
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "engine process exited" in info.value.details() and first
            # readiness went false, then the restarted process serves the same streams
            seen = set()

            def back():
                seen.add(_health(channel))
                return server.plane.ready and server.link.restarts == 1

            eventually(back, timeout=60)
            assert server.link.process.pid != pid
            eventually(
                lambda: _health(channel) == health_pb2.HealthCheckResponse.SERVING, timeout=10
            )
            assert _text(_responses(target, REQUESTS[0])) == want
    assert server.link.process.poll() == 0


def test_startup_fails_clearly_when_the_engine_process_cannot_load(tmp_path, repository):
    root = _copy(tmp_path, repository)
    step = root / "char_lstm" / "1"
    graph = next(p for p in step.iterdir() if p.name.endswith(".onnx") and "prefill" not in p.name)
    config = loopback_config(root, engine_process=True)
    from serving.core.repository import ModelRegistry

    registry = ModelRegistry.load(root, "cpu")  # loaded here, then broken on disk
    graph.write_bytes(b"not onnx")
    started, before = time.monotonic(), _engine_processes()  # other tests' servers' own
    with pytest.raises(Exception, match="char_lstm version 1 in the engine process"):
        create_server(config, registry)
    assert time.monotonic() - started < 60
    assert _engine_processes() == before, "the engine process outlived the server that failed"


def _engine_processes() -> list[int]:
    """Live `python -m serving.remote` children of this process."""
    return harness.children(os.getpid(), "serving.remote")


def test_a_new_version_loads_into_the_engine_process_and_the_old_one_leaves(tmp_path, repository):
    root = _copy(tmp_path, repository)
    with _served(root, **POLL) as (server, target):
        want = _text(_responses(target, REQUESTS[0]))
        assert _versions(server) == ["char_lstm/1"]
        staging = root / "char_lstm" / ".staging-2"
        shutil.copytree(root / "char_lstm" / "1", staging)
        staging.rename(root / "char_lstm" / "2")  # published whole, as export does
        eventually(lambda: server.registry.models["char_lstm"].version == "2", timeout=30)
        assert server.engines["char_lstm"].model.version == "2"
        assert _text(_responses(target, REQUESTS[0])) == want  # the same export, now v2
        eventually(lambda: _versions(server) == ["char_lstm/2"], timeout=10)


def test_coalescing_happens_in_the_engine_process_and_is_not_done_twice(remote):
    """With stream_interval_ms, a stream's parts wait in the engine process (one message
    per interval crosses to the frontend) and carry when they were produced, so the
    frontend's reader sends them on at once: the same text as a message per token, the
    first message one token, and messages an interval apart (held twice, two)."""
    import statistics

    options = dict(prompt="KING.\n", max_tokens=4096, min_tokens=4096, seed=9)
    per_token = _text(_responses(remote[1], {**options, "stream_interval_ms": 0}))
    arrivals, texts = [], []
    with StepwiseClient(remote[1], timeout=60) as client:
        for r in client.generate_stream(model="char_lstm", stream_interval_ms=100, **options):
            arrivals.append(time.monotonic())
            texts.append(r.text)
    assert "".join(texts) == per_token[0] and len(texts[0]) == 1  # the first token alone
    gaps = list(np.diff(arrivals[:-1]))  # the end goes at once
    assert len(gaps) >= 3, f"the stream lasted too few intervals: {arrivals}"
    assert 0.075 <= statistics.median(gaps) <= 0.15, gaps
    assert remote[0].engines["char_lstm"].occupancy() == (0, 0)


def test_the_engine_process_writes_its_log_lines_in_the_servers_format(repository):
    """Under --log-format json every line on the server's stderr is one JSON object, the
    engine process's included."""
    import json

    from test_cli import start_server

    proc, target = start_server(repository, "--log-format", "json", "--engine-process", "on")
    try:
        assert _text(_responses(target, REQUESTS[1]))[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    entries = [json.loads(line) for line in proc.stdout.read().splitlines() if line.strip()]
    engine = [e for e in entries if e["logger"].startswith("serving.remote.host")]
    assert any("listening" in e["message"] for e in engine), entries[:5]
    assert any("stopping" in e["message"] for e in engine)


def _versions(server) -> list[str]:
    """The step model versions loaded in the server's engine process."""
    return sorted(f"{e.model.name}/{e.model.version}" for e in server.link._engines.values())


def test_a_same_version_reload_gets_an_engine_of_its_own(tmp_path, repository):
    """An edited config.pbtxt reloads version 1: the new deployment's engine is loaded
    anew in the engine process, and retiring the old one does not close it."""
    root = _copy(tmp_path, repository)
    with _served(root, **POLL) as (server, target):
        want = _text(_responses(target, REQUESTS[0]))
        old = server.engines["char_lstm"]
        pbtxt = root / "char_lstm" / "config.pbtxt"
        pbtxt.write_text(pbtxt.read_text().replace("max_batch_size: 64", "max_batch_size: 32"))
        eventually(lambda: server.engines["char_lstm"] is not old, timeout=30)
        assert server.engines["char_lstm"].config.max_batch_size == 32
        eventually(lambda: old.closed and len(server.link._engines) == 1, timeout=10)
        assert _text(_responses(target, REQUESTS[0])) == want  # the new engine serves
        assert server.plane.ready


def test_a_restart_that_cannot_load_retries_until_it_can(tmp_path, repository):
    root = _copy(tmp_path, repository)
    with _served(root) as (server, target):
        want = _text(_responses(target, REQUESTS[0]))
        version, aside = root / "char_lstm" / "1", tmp_path / "aside"
        version.rename(aside)  # a restarted process cannot load it now
        os.kill(server.link.process.pid, signal.SIGKILL)
        time.sleep(2.0)  # restarts fail meanwhile
        assert not server.plane.ready and server.link.restarts == 0
        aside.rename(version)
        eventually(lambda: server.plane.ready and server.link.restarts == 1, timeout=30)
        assert _text(_responses(target, REQUESTS[0])) == want
    assert server.link.process.poll() == 0  # the restarted process stopped with its server
