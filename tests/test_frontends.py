"""`python -m serving --frontends N` (issue 20 item 5), as a user runs it: N gRPC
servers sharing one port over one shared engine process. Streams through either
frontend equal the one-process server's; both frontends take connections; /metrics sums
them and counts each engine once; a killed frontend or engine process is started again
and serving resumes; SIGTERM stops every process; what cannot work is refused. Also the
pieces directly: the page merge, and the engine process sharing one engine between
connections."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from multiprocessing import Pipe

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from polling import eventually
from test_kserve import _infer
from test_perf_analyzer import MEASURE as PERF_MEASURE
from test_perf_analyzer import TOOL as PERF_TOOL
from test_perf_analyzer import perf_analyzer  # noqa: F401 - the fixture

from bench import harness
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.core.runtime import SessionFactory
from serving.engine import EngineConfig
from serving.metrics.merge import merge
from serving.remote.host import EngineHost, Outbound, _reported

REQUEST = dict(model="char_lstm", prompt="KING.\n", max_tokens=80, temperature=0.8, seed=7)
CONNECTIONS = 16  # one channel each: the chance all land on one of 2 frontends is 2^-15
FAST_STOP = ["--drain-delay", "0", "--grace-period", "5"]
_OWN = [("grpc.use_local_subchannel_pool", 1)]  # a channel that shares no connection


def _frontends(args=(), metrics_port=None, **popen):
    """`python -m serving --frontends 2` on the test repository; ready once health
    answers (and, with a metrics port, once both frontends serve)."""
    server = harness.start(
        ["--frontends", "2", "--no-request-log", *FAST_STOP, *args],
        metrics_port=metrics_port or 0,  # 0: none
        stop_timeout=30, **popen,
    )  # fmt: skip
    if metrics_port:
        ready = eventually(lambda: _metric(metrics_port, "stepwise_frontends") == [2.0], 60)
        assert ready, "both frontends serve"
    return server


@pytest.fixture(scope="module")
def supervised(repository):
    port = harness.free_port()
    server = _frontends(["--model-repository", str(repository), "--device", "cpu"], port)
    yield server, port
    server.stop()


def _page(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(metrics_port: int, name: str, labels: str = "") -> list[float]:
    """The values of `name`'s samples whose labels contain `labels`."""
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return [float(v) for k, v in pattern.findall(_page(metrics_port)) if labels in (k or "")]


def _generate(target: str, **request) -> tuple[str, str]:
    """A Generate over a connection of its own: (text, finish reason)."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # never shares another's connection
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.InferenceStub(channel)
        parts = list(stub.Generate(pb.GenerateRequest(**request), timeout=60))
    return "".join(p.text for p in parts), parts[-1].finish_reason


def _in_process(server) -> tuple[str, str]:
    return _generate(f"127.0.0.1:{server[1]}", **REQUEST)


def _spread(metrics_port: int, rpc: str = "Generate") -> dict[str, float]:
    """Frontend index -> the `rpc` calls it answered (the supervisor's page)."""
    pattern = re.compile(
        rf'^stepwise_frontend_requests_total\{{frontend="(\d+)",rpc="[^"]*/{rpc}"\}} (\S+)$', re.M
    )
    return {index: float(n) for index, n in pattern.findall(_page(metrics_port))}


def _grew(before: dict, after: dict) -> bool:
    return len(after) == 2 and all(after[i] > before.get(i, 0) for i in after)


def test_streams_through_every_frontend_equal_one_process_and_metrics_add_up(supervised, server):
    proc, metrics_port = supervised
    want = _in_process(server)
    generate = 'rpc="stepwise.v1.Inference/Generate"'

    def tokens():  # reported by the engine process within its report interval
        return sum(_metric(metrics_port, "stepwise_tokens_generated_total", 'model="char_lstm"'))

    spread, ok, before = (
        _spread(metrics_port),
        _metric(metrics_port, "stepwise_requests_total", generate),
        tokens(),
    )
    results: list = [None] * CONNECTIONS

    def one(i):
        results[i] = _generate(proc.target, **REQUEST)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [want] * CONNECTIONS  # seeded: batched across frontends, same text
    # The kernel spread the connections over both frontends...
    assert _grew(spread, _spread(metrics_port)), (spread, _spread(metrics_port))
    # ...and the page sums them: every Generate once, every engine token once (the
    # shared engine reports to one frontend; doubled, this would be 2x).
    assert sum(_metric(metrics_port, "stepwise_requests_total", generate)) - sum(ok) == CONNECTIONS
    assert eventually(lambda: tokens() - before == CONNECTIONS * REQUEST["max_tokens"], 5)
    time.sleep(0.3)  # and it stays there: no frontend counts them a second time
    assert tokens() - before == CONNECTIONS * REQUEST["max_tokens"]
    assert len(_metric(metrics_port, "nv_cpu_memory_total_bytes")) == 1


def _statistics(target: str, model: str = "lenet5"):
    """ModelStatistics over a connection of its own (so from either frontend)."""
    with grpc.insecure_channel(target, options=_OWN) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        (stats,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=model)).model_stats
    return stats


def test_model_statistics_from_any_frontend_count_every_frontend(supervised):
    """perf_analyzer compares the counts of two ModelStatistics calls, which may land on
    different frontends: each answers for all of them."""
    proc, metrics_port = supervised
    before, spread = _statistics(proc.target).inference_count, _spread(metrics_port, "ModelInfer")
    x = np.zeros((2, 1, 32, 32), np.float32)
    for _ in range(CONNECTIONS):  # 2 rows each, each on a connection of its own
        with grpc.insecure_channel(proc.target, options=_OWN) as channel:
            _infer(kpb_grpc.GRPCInferenceServiceStub(channel), "lenet5", {"input": x})
    assert _grew(spread, _spread(metrics_port, "ModelInfer"))  # both frontends took some
    answers = [_statistics(proc.target) for _ in range(8)]
    assert {a.inference_count - before for a in answers} == {2 * CONNECTIONS}
    assert {a.inference_stats.success.count for a in answers} == {
        answers[0].inference_stats.success.count
    }


@pytest.mark.usefixtures("perf_analyzer")  # skips, saying why, where it cannot be had
def test_perf_analyzer_measures_several_frontends(supervised):
    """NVIDIA's perf_analyzer, each context on a connection of its own (16: all on one
    frontend one time in 2^15), with its server-side statistics on: it fails ("failed to find the
    requested model version") when two of its ModelStatistics calls disagree."""
    proc, metrics_port = supervised
    spread = _spread(metrics_port, "ModelInfer")
    done = subprocess.run(
        ["bash", str(PERF_TOOL), "-u", proc.target, "-i", "grpc", "-m", "lenet5",
         "--input-data", "zero", "--concurrency-range", "16", *PERF_MEASURE],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT="1"),
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert re.search(r"Successful request count: [1-9]", done.stdout), done.stdout[-2000:]
    assert _grew(spread, _spread(metrics_port, "ModelInfer"))


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_killed_engine_process_is_started_again_and_every_frontend_serves_again(
    supervised, server
):
    proc, metrics_port = supervised
    (engine,) = harness.children(proc.pid, "serving.remote")
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(proc.target, options=options) as channel:
        stub = pb_grpc.InferenceStub(channel)
        call = stub.Generate(
            pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=4096,
                               min_tokens=4096, stream_interval_ms=0), timeout=60,
        )  # fmt: skip
        assert next(call).text
        os.kill(engine, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine process exited" in info.value.details()
    assert eventually(lambda: len(harness.children(proc.pid, "serving.remote")) == 1, 30)
    assert harness.children(proc.pid, "serving.remote") != [engine]
    # Both frontends connect again and load their versions: every connection serves
    # (12 in a row, each on a connection of its own, spread over both frontends).
    want, before = _in_process(server), _spread(metrics_port)
    assert eventually(lambda: all(_served(proc.target) == want for _ in range(12)), 60)
    assert _grew(before, _spread(metrics_port)), (before, _spread(metrics_port))


def _served(target: str):
    """A Generate's (text, finish reason), None when refused UNAVAILABLE."""
    try:
        return _generate(target, **REQUEST)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def test_killed_frontends_are_started_again_and_the_engine_process_stays(supervised, server):
    """Both at once: were either the engine process's owner (say after the restart
    above, which both reconnected to), the engine process would stop with it. Counters
    on the summed page never go down: a dead frontend's last totals stay in the sum."""
    proc, metrics_port = supervised
    frontends = harness.children(proc.pid, "--frontend-of")
    (engine,) = harness.children(proc.pid, "serving.remote")
    assert len(frontends) == 2
    spread, ok = _spread(metrics_port), _metric(metrics_port, "stepwise_requests_total", "OK")
    for pid in frontends:
        os.kill(pid, signal.SIGKILL)
    assert eventually(
        lambda: len(set(harness.children(proc.pid, "--frontend-of")) - set(frontends)) == 2, 60
    )
    assert eventually(lambda: _metric(metrics_port, "stepwise_frontends") == [2.0], 60)
    assert harness.children(proc.pid, "serving.remote") == [engine]
    assert sum(_metric(metrics_port, "stepwise_requests_total", "OK")) >= sum(ok)
    want = _in_process(server)
    assert eventually(lambda: all(_served(proc.target) == want for _ in range(12)), 60)
    assert _grew(spread, _spread(metrics_port)), (spread, _spread(metrics_port))


def test_sigterm_stops_every_process_and_exits_0(repository):
    with _frontends(["--model-repository", str(repository), "--device", "cpu"]) as srv:
        pids = harness.children(srv.pid)
        assert len(pids) == 3  # the engine process and two frontends
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    assert eventually(lambda: not any(harness.alive(pid) for pid in pids), timeout=10)


def _refused(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving", "--host", "127.0.0.1", "--metrics-port", "0", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_what_several_frontends_cannot_do_is_refused(repository):
    explicit = _refused(
        "--model-repository", str(repository), "--port", str(harness.free_port()),
        "--frontends", "2", "--model-control-mode", "explicit",
    )  # fmt: skip
    assert explicit.returncode == 1 and "--model-control-mode none or poll" in explicit.stderr
    one_process = _refused("--frontends", "2", "--engine-process", "off")
    assert one_process.returncode == 2 and "--engine-process off" in one_process.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _refused(
            "--model-repository", str(repository), "--port", str(port), "--frontends", "2"
        )
    assert busy.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    assert "engine process" not in busy.stderr  # refused before anything started


# ---- the pieces ------------------------------------------------------------------------


def test_merge_sums_samples_keeps_families_whole_and_the_machine_once():
    a = (
        "# HELP nv_cpu_utilization CPU\n# TYPE nv_cpu_utilization gauge\nnv_cpu_utilization 0.5\n"
        '# HELP req RPCs\n# TYPE req counter\nreq{rpc="A"} 3\n'
        "# HELP lat seconds\n# TYPE lat histogram\n"
        'lat_bucket{le="0.1"} 1.0\nlat_bucket{le="+Inf"} 2.0\nlat_sum 0.25\nlat_count 2.0\n'
    )
    b = (
        "# HELP nv_cpu_utilization CPU\n# TYPE nv_cpu_utilization gauge\nnv_cpu_utilization 0.7\n"
        '# HELP req RPCs\n# TYPE req counter\nreq{rpc="A"} 4\nreq{rpc="B"} 1\n'
        "# HELP lat seconds\n# TYPE lat histogram\n"
        'lat_bucket{le="0.1"} 0.0\nlat_bucket{le="+Inf"} 1.0\nlat_sum 0.5\nlat_count 1.0\n'
    )
    assert merge([a, b]).splitlines() == [
        "# HELP nv_cpu_utilization CPU", "# TYPE nv_cpu_utilization gauge",
        "nv_cpu_utilization 0.5",  # the machine's: the first page's, not 1.2
        "# HELP req RPCs", "# TYPE req counter",
        'req{rpc="A"} 7', 'req{rpc="B"} 1',  # B's sample stays in its family's group
        "# HELP lat seconds", "# TYPE lat histogram",
        'lat_bucket{le="0.1"} 1.0', 'lat_bucket{le="+Inf"} 3.0', "lat_sum 0.75", "lat_count 3.0",
    ]  # fmt: skip
    assert merge([a]) == a
    # a gone process's last page: its counters and histograms stay, its gauges do not
    summed = merge([a], carried=[b]).splitlines()
    assert "nv_cpu_utilization 0.5" in summed and 'req{rpc="B"} 1' in summed
    assert 'req{rpc="A"} 7' in summed and "lat_count 3.0" in summed
    assert merge([], carried=[b]).splitlines()[2:3] == ["# HELP req RPCs"]  # no gauge sample


def test_the_engine_process_shares_one_engine_between_connections(repository, tmp_path):
    """Two connections loading the same version under keys of their own get one engine;
    it reports to the first only, and closes when the last lets go. Changed files are
    another engine."""
    host = EngineHost(str(tmp_path / "engine.sock"), b"k", SessionFactory("cpu"))
    ends = [Pipe() for _ in range(3)]
    first, second, third = (Outbound(a) for a, _ in ends)
    directory, config = str(repository / "char_lstm" / "1"), EngineConfig()
    try:
        host._load(first, "char_lstm/1#1", directory, config)
        host._load(second, "char_lstm/1#4", directory, config)
        assert [b.recv() for _, b in ends[:2]] == [
            ("loaded", "char_lstm/1#1", None), ("loaded", "char_lstm/1#4", None)
        ]  # fmt: skip
        engine = first.keys["char_lstm/1#1"]
        assert second.keys["char_lstm/1#4"] is engine and len(host.shared) == 1
        assert list(_reported(first)) == ["char_lstm/1#1"] and _reported(second) == {}
        host._unload(first, "char_lstm/1#1")
        assert not engine.engine.closed and list(_reported(second)) == ["char_lstm/1#4"]
        # the same version with another engine configuration: an engine of its own
        host._load(third, "char_lstm/1#1", directory, EngineConfig(max_batch_size=2))
        assert ends[2][1].recv()[2] is None
        assert third.keys["char_lstm/1#1"] is not engine and len(host.shared) == 2
        host._unload(second, "char_lstm/1#4")
        assert engine.engine.closed and len(host.shared) == 1
        # a connection that went away while its load waited: nothing of it stays
        second.close()
        host._load(second, "char_lstm/1#5", directory, config)
        assert second.keys == {} and len(host.shared) == 1 and not ends[1][1].poll(0.1)
    finally:
        for out in (first, second, third):
            out.close()
        for h in list(host.shared.values()):
            h.engine.close()
        host.listener.close()


def _received_end(conn, job_id: int, timeout: float) -> bool:
    """Read `conn` (an engine process's messages) until job `job_id` ends; False if it
    has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while conn.poll(max(0.0, deadline - time.monotonic())):
        message = conn.recv()
        if message[0] != "deltas":
            continue
        for item in message[1]:
            if item[0] == job_id and len(item) == 2 and item[1].finished:
                return True
    return False


def test_a_frontend_that_stops_reading_holds_up_no_other_frontends_streams(repository, tmp_path):
    """Two connections share one engine, and one stops reading (its socket buffers full).
    The other's stream still runs to its end, and the silent one is cut off after its
    stall time: its connection shut, what was queued for it dropped. (Before, the engine's
    thread blocked writing to it, and every stream of that engine stopped.)"""
    from serving.core.models import load_model
    from serving.engine import text_request
    from serving.engine.sampler import SamplingParams

    host = EngineHost(str(tmp_path / "engine.sock"), b"k", SessionFactory("cpu"))
    (stalled_end, silent), (live_end, reader) = Pipe(), Pipe()
    for end in (stalled_end, silent):  # small buffers: full after a few messages
        with socket.fromfd(end.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled, live = Outbound(stalled_end, stall_s=0.5), Outbound(live_end)
    directory, config = repository / "char_lstm" / "1", EngineConfig()
    lm = load_model(directory, "cpu")
    try:
        host._load(stalled, "lm#1", str(directory), config)
        host._load(live, "lm#2", str(directory), config)
        assert silent.recv() == ("loaded", "lm#1", None)
        assert reader.recv() == ("loaded", "lm#2", None)
        assert stalled.keys["lm#1"] is live.keys["lm#2"]  # one engine for both
        params = SamplingParams(temperature=0.8, seed=1, min_tokens=4096)
        host._handle(stalled, ("submit", "lm#1", text_request(lm, "KING", 4096, params)))
        # its writer is stuck (or, on a slow machine, already cut off)
        assert eventually(lambda: stalled._sending_since or stalled.cut_off, 10)
        job = text_request(lm, "QUEEN", 200, SamplingParams(seed=2, min_tokens=200))
        host._handle(live, ("submit", "lm#2", job))
        assert _received_end(reader, job.id, 30), "the live stream stopped with the silent one"

        def cut_off() -> bool:
            stalled.watch()  # as its connection's reader does while the frontend is quiet
            return stalled.cut_off

        assert eventually(cut_off, 10)
        with pytest.raises((EOFError, OSError)):  # what was written, then the end
            for _ in range(100_000):
                silent.recv()
    finally:
        for out in (stalled, live):
            out.close()
        for h in list(host.shared.values()):
            h.engine.close()
        host.listener.close()
