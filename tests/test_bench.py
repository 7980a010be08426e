"""The benchmark's parts on tiny models: in-process timings, the echo server as the
transport ceiling, and the ratios written into the document; and bench.harness, which
the tests, the benchmarks and deploy/ start servers and read memory with."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest

from bench import document, harness, inprocess
from bench.echo_server import Echo
from loadtest.__main__ import main as loadtest
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc


def test_in_process_limits_and_recompute(repository):
    steps = inprocess.step_graph(repository / "char_lstm" / "1", [1, 4], 0.05)
    assert [(r["model"], r["batch"]) for r in steps] == [("char_lstm", 1), ("char_lstm", 4)]
    assert all(r["tokens_per_s"] > 0 and r["us_per_call"] > 0 for r in steps)
    images = inprocess.classifier(repository / "lenet5" / "1", [1, 8], 0.05)
    assert [r["batch"] for r in images] == [1, 8] and all(r["images_per_s"] > 0 for r in images)
    (row,) = inprocess.step_vs_recompute(repository / "char_lstm" / "1", [40])
    assert row["tokens"] == 40 and row["stepwise_s"] > 0 and row["recompute_s"] > 0
    # speedup is rounded to 0.1 and the times to 0.1 ms: compare within that rounding
    ratio = row["recompute_s"] / row["stepwise_s"]
    assert row["speedup"] == pytest.approx(ratio, rel=0.1, abs=0.06)


@pytest.fixture()
def echo_target():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_InferenceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_echo_server_streams_the_requested_tokens(echo_target, tmp_path):
    flags = "--rpc generate --max-tokens 9 --concurrency 2 --duration 0.6 --warmup 0.2 --quiet"
    argv = ["--target", echo_target, *flags.split(), "--output-dir", str(tmp_path)]
    assert loadtest(argv) == 0
    (level,) = json.loads((tmp_path / "results.json").read_text())["levels"]
    assert level["successes"] > 0 and level["errors"] == {}
    tokens = level["tokens_per_s"] * level["seconds"]  # by arrival: +- the 2 in flight
    assert 9 * (level["successes"] - 2) <= tokens <= 9 * (level["successes"] + 2)
    assert level["tokens_per_message"] == 1


def test_document_ratios_come_from_the_same_run(tmp_path):
    def level(c, rps, tokens=0.0):
        return {"concurrency": c, "throughput_rps": rps, "tokens_per_s": tokens, "errors": {},
                "latency_us": {"p50": 1000, "p99": 3000}, "server_cpu_s_per_request": 0.001,
                "ttft_us": {"p50": 500}, "itl_us": {"p50": 100},
                "server_cpu_s_per_1k_tokens": 0.5}  # fmt: skip

    report = {
        "machine": {"cpu": "test", "cores": 2, "python": "3", "onnxruntime": "1",
                    "grpcio": "1"},
        "command": "make bench", "seconds": 1.0,
        "limit_steps": [{"model": "char_lstm", "batch": b, "us_per_call": 1,
                         "tokens_per_s": t, "tokens_per_cpu_s": t}
                        for b, t in ((1, 1000.0), (64, 10000.0))],
        "limit_classifiers": [{"model": "lenet5", "batch": b, "us_per_call": 1,
                               "images_per_s": t, "images_per_cpu_s": t}
                              for b, t in ((1, 4000.0), (32, 8000.0))],
        "recompute": [{"tokens": 64, "stepwise_s": 0.1, "recompute_s": 1.0, "speedup": 10.0}],
        "runs": {
            "served classify lenet5 PNG": [level(1, 400.0)],
            "transport classify": [level(1, 2000.0)],
            "baseline classify lenet5 PNG": [level(1, 100.0)],
            "batched classify lenet5 PNG": [level(1, 800.0)],
            "served generate char_lstm": [level(1, 2.0, 500.0)],
            "transport generate": [level(1, 20.0, 5000.0)],
            "baseline generate char_lstm": [level(1, 1.0, 250.0)],
        },
    }  # fmt: skip
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nkept\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n")
    document.write(report, doc, tmp_path)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept") and text.endswith("tail\n") and "old" not in text
    # lenet5 PNG, 1 client: 400/4000 of the limit at batch 1, 400/8000 at 32, 400/2000 of
    # the transport, 400/100 of the baseline.
    assert "| lenet5 PNG | 1 | 400 | 1.00 | 3.00 | 1.00 | 0.10x | 0.05x | 0.20x | 4.00x |" in text
    # Generate, 1 stream: 500 tokens/s against 1000 (b1), 10000 (b64), 5000, 250.
    assert "| 0.50x | 0.05x | 0.10x | 2.00x |" in text
    assert "| 64 | 0.1 | 1.0 | 10.0x |" in text
    # Batching on (800) against off (the served 400) and against the transport (2000).
    assert "| lenet5 PNG | 1 | 400 | 3.00 | 800 | 3.00 | 2.00x | 0.40x |" in text


def test_the_perf_analyzer_section_puts_both_load_generators_and_triton_side_by_side():
    level = {
        "concurrency": 1, "infer_per_s": 1200.0, "p50_us": 800.0, "p99_us": 3000.0,
        "server_queue_us": 40.0, "server_input_us": 60.0, "server_infer_us": 90.0,
        "server_output_us": 80.0,
    }  # fmt: skip
    figures = {
        "server_flags": "--device cpu",
        "classifiers": {
            "lenet5": {
                "perf_analyzer": {"command": "perf_analyzer ...", "levels": [level]},
                "loadtest": [{"concurrency": 1, "throughput_rps": 1000.0}],
            }
        },
        "sequences": {
            "char_lstm": {
                "perf_analyzer": {"command": "perf_analyzer ...", "error": "it broke"},
                "loadtest": [],
            }
        },
    }
    text = "\n".join(document.perf_section(figures))
    row = "| lenet5 ModelInfer | 1 | 1,200 | 1,000 | 1.20x | 0.80 / 3.00 | 40 / 60 / 90 / 80 |"
    assert row in text
    assert "3,785 (0.32x)" in text  # Triton 2.51's figure, cited
    assert "char_lstm | - | failed: it broke" in text
    gone = document.perf_section({"unavailable": "no libb64"})
    assert gone[-1] == "Not measured in this run: perf_analyzer unavailable (no libb64)"


def test_harness_start_says_why_a_server_never_became_ready(tmp_path):
    with pytest.raises(harness.NotReady) as piped:
        harness.start(["--model-repository", str(tmp_path / "none")], timeout=60,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert "exited with status 1" in str(piped.value)
    assert f"model repository {tmp_path / 'none'} does not exist" in str(piped.value)
    log = tmp_path / "server.log"
    with pytest.raises(harness.NotReady, match="does not exist"):
        harness.start(["--model-repository", str(tmp_path / "none")], log=log, timeout=60)
    assert "does not exist" in log.read_text()


SLEEPER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@LINUX
def test_harness_stop_ends_a_session_leader_and_its_children(tmp_path):
    log = tmp_path / "sleeper.log"
    proc = harness.spawn([sys.executable, "-c", SLEEPER], log, start_new_session=True)
    child = int(harness.until("the child's pid", lambda: log.read_text().strip(), 30))
    assert harness.memory(child)["VmRSS"] > 0
    assert harness.stop(proc, timeout=10) == -signal.SIGTERM
    assert harness.until("the child gone", lambda: harness.memory(child)["VmRSS"] == 0, 10)
    assert harness.memory(proc.pid) == {"VmRSS": 0, "VmHWM": 0}  # gone: zeros
    with pytest.raises(ProcessLookupError):
        harness.rss_bytes(proc.pid)


@LINUX
def test_harness_reads_this_process_memory():
    here = harness.memory(os.getpid())
    assert 0 < here["VmRSS"] <= here["VmHWM"]
    assert harness.rss_bytes() > 0 and harness.peak_rss_bytes() >= here["VmRSS"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", harness.free_port()))  # free: nothing holds it


def test_stream_layers_pass_every_message_through_the_real_wrappers():
    """bench.stream_layers times the server's own wrappers (slots, the streaming
    decorator, the call wrapper with its watchers): each must deliver every message."""
    import asyncio

    from bench import stream_layers

    async def run():
        return [await stream_layers._time(make, 50) for _, make in stream_layers._layers(50)]

    times = asyncio.run(run())  # _time asserts that all 50 messages came through
    assert len(times) == 5 and all(t > 0 for t in times)


def test_engine_iteration_splits_each_iteration_into_graph_sampling_and_the_rest(repository):
    """bench.engine_iteration steps real streams to their end, every stream in every
    iteration, and its parts add up to no more than the whole."""
    from bench import engine_iteration

    r = engine_iteration.measure(repository / "char_lstm" / "1", streams=3, tokens=20)
    # The first token comes with the prompt; then one per stream per iteration to the end.
    assert r["iterations"] == 19
    assert 0 < r["graph_us"] and 0 < r["sampling_us"] and r["rest_us"] > 0
    assert r["graph_us"] + r["sampling_us"] < r["wall_us"]
    assert r["tokens_per_s"] > 0
