"""SIGTERM in a subprocess with live streams: health turns NOT_SERVING at once, new
requests get UNAVAILABLE after the drain delay, streams finish or end with UNAVAILABLE
saying the server is shutting down (their tokens so far delivered), and the process
exits 0 within the grace period. A second SIGTERM exits at once."""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import eventually
from test_cli import start_server

from bench import harness
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

DRAIN_S, GRACE_S = 0.5, 3.0


class Stream(threading.Thread):
    """One Generate stream read to its end on a thread: its text, and how it ended."""

    def __init__(self, stub, seed: int):
        super().__init__(daemon=True)
        # min_tokens: no stream ends early on EOS, so some are cut by the grace period
        # whatever the session's tiny model learned (a full-suite run once saw all 8 end);
        # a message per token (stream_interval_ms 0) keeps each stream as slow as the
        # transport makes it, not the faster coalesced default.
        request = pb.GenerateRequest(
            model="char_lstm", prompt="KING.\n", max_tokens=4096, min_tokens=4096, seed=seed,
            stream_interval_ms=0,
        )  # fmt: skip
        self.call = stub.Generate(request, timeout=60)
        self.text, self.finish_reason, self.code, self.details = "", "", None, ""
        self.first = threading.Event()

    def run(self):
        try:
            for response in self.call:
                self.text += response.text
                self.finish_reason = response.finish_reason or self.finish_reason
                self.first.set()
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details()


def _list_models_code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.InferenceStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("engine_process", ["off", "on"])
def test_sigterm_drains_live_streams_and_exits_0(repository, engine_process):
    # Two batch rows: the streams take turns (0.4 to 2 s each here, as loaded as the
    # machine is), 32 of them, so some are still generating or queued when the grace
    # period ends however fast they run (8 once all finished on a quiet machine). With
    # one row, the stream that had just taken it as the grace period ended could be cut
    # before its first token, leaving no cut stream with text (seen once in CI); with two,
    # both rows would have to be in that first moment at once.
    proc, target = start_server(
        repository, "--drain-delay", str(DRAIN_S), "--grace-period", str(GRACE_S),
        "--stream-batch-size", "2", "--engine-process", engine_process,
    )  # fmt: skip
    children = harness.children(proc.pid)
    assert len(children) == (engine_process == "on")
    channels = [  # each its own connection: 8 streams is a connection's cap
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(4)
    ]
    channel = channels[0]
    try:
        with contextlib.ExitStack() as stack:
            for each in channels:
                stack.enter_context(each)
            streams = [
                Stream(pb_grpc.InferenceStub(channels[seed // 8]), seed) for seed in range(32)
            ]
            for stream in streams:
                stream.start()
            assert eventually(lambda: any(s.first.is_set() for s in streams), 20), (
                "no stream produced anything"
            )
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # Checked on the connection already open: a new one per check spent the short
            # drain window connecting on a loaded machine and saw only SERVING
            health, seen = health_pb2_grpc.HealthStub(channel), None
            while time.monotonic() - start < DRAIN_S and seen != 2:  # NOT_SERVING
                seen = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            assert seen == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(max(0.0, start + DRAIN_S + 0.3 - time.monotonic()))
            # Past the drain delay: new requests are refused, on a new connection and on
            # the one the live streams hold.
            with grpc.insecure_channel(target) as fresh:
                assert _list_models_code(fresh) == grpc.StatusCode.UNAVAILABLE
            assert _list_models_code(channel) == grpc.StatusCode.UNAVAILABLE
            for stream in streams:
                stream.join(timeout=DRAIN_S + GRACE_S + 5 - (time.monotonic() - start))
                assert not stream.is_alive(), "a stream hung past the grace period"
        assert proc.wait(timeout=DRAIN_S + GRACE_S + 5) == 0
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
    assert elapsed < DRAIN_S + GRACE_S + 2
    ended = [s for s in streams if s.code != grpc.StatusCode.OK]
    assert ended, "every stream finished: the test no longer exercises the grace period"
    for stream in streams:
        if stream.code == grpc.StatusCode.OK:
            assert stream.finish_reason in ("length", "eos") and stream.text
        else:
            assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.details)
            assert "the server is shutting down" in stream.details
            assert f"{GRACE_S:g} s grace period" in stream.details
            assert not stream.finish_reason
    assert any(s.text for s in ended), "the stream cut short keeps its tokens so far"
    log = proc.stdout.read()
    assert "SIGTERM received" in log and "shutting down: NOT_SERVING" in log
    assert f"ended {len(ended)} call(s) still live after {GRACE_S:g} s" in log
    assert log.count("code=UNAVAILABLE") >= len(ended)  # the request log saw the status
    assert "stopped after" in log and "Traceback" not in log
    # the engine process stopped with its server
    assert not any(harness.alive(child) for child in children)


def test_a_second_sigterm_exits_at_once_with_streams_live(repository):
    """Documented: the second signal does not wait (exit status 128 + SIGTERM)."""
    proc, target = start_server(repository, "--drain-delay", "60", "--stream-batch-size", "1")
    try:
        with grpc.insecure_channel(target) as channel:
            stream = Stream(pb_grpc.InferenceStub(channel), seed=1)
            stream.start()
            assert stream.first.wait(20)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 128 + signal.SIGTERM
            assert time.monotonic() - start < 5
            stream.join(timeout=10)
            assert not stream.is_alive()
            assert stream.code == grpc.StatusCode.UNAVAILABLE  # the connection went away
    finally:
        proc.kill()
    assert "second SIGTERM: exiting at once" in proc.stdout.read()


def test_health_watchers_hear_not_serving_and_do_not_hold_the_stop(repository):
    """A client watching health (gRPC's client-side health checking) sees SERVING, then
    NOT_SERVING at the signal; its stream then ends with UNAVAILABLE as the server stops,
    instead of holding the stop for the whole grace period."""
    grace = 20.0
    proc, target = start_server(
        repository, "--drain-delay", str(DRAIN_S), "--grace-period", str(grace)
    )
    seen, outcome = [], {}
    try:
        with grpc.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )

            def read():
                try:
                    for response in watch:
                        seen.append(response.status)
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    outcome["code"], outcome["details"] = exc.code(), exc.details()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.05)
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=grace + 10) == 0
            elapsed = time.monotonic() - start
            reader.join(timeout=5)
    finally:
        proc.kill()
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
    assert seen[:1] == [serving] and not_serving in seen
    assert outcome.get("code") == grpc.StatusCode.UNAVAILABLE, outcome
    assert elapsed < DRAIN_S + 5 < grace  # not held for the grace period


def test_sigterm_delivered_to_another_thread_still_shuts_down(repository):
    """The kernel gives a process's signal to any of its threads; under load that is often
    a busy gRPC thread, and `docker stop` of a loaded replica in the compose test waited
    out its 40 s stop_grace_period, then killed it. Here the signal goes to one thread
    that is not the main one (tgkill), every time."""
    import ctypes
    import os

    proc, _ = start_server(repository, "--drain-delay", "0", "--grace-period", "1")
    try:
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert others, "the server runs threads besides its main one"
        libc = ctypes.CDLL(None, use_errno=True)
        sys_tgkill = 131 if os.uname().machine == "aarch64" else 234  # else: x86_64
        assert libc.syscall(sys_tgkill, proc.pid, others[-1], signal.SIGTERM) == 0
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
    assert "SIGTERM received" in proc.stdout.read()
