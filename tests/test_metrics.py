"""Prometheus metrics: Triton's names and labels read from the real counters, stepwise's
histograms and gauges, scraped over HTTP from a real server and parsed with
prometheus_client's own parser."""

from __future__ import annotations

import io
import re
import time
import urllib.error
import urllib.request

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import loopback_config
from serving.api.security import SecurityConfig
from serving.app import create_server
from serving.client import StepwiseClient
from serving.engine import EngineConfig
from serving.metrics.prometheus import HostUsage


@pytest.fixture(scope="module", params=[False, True], ids=["one-process", "engine-process"])
def served(repository, request):
    config = loopback_config(repository, metrics_port=0, engine_process=request.param)
    server, port = create_server(config)
    server.start()
    with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as client:
        yield server, client, f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
    server.stop(None)


SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, headers: dict | None = None) -> tuple[str, dict]:
    """The page, and {(sample name, sorted labels): value}."""
    request = urllib.request.Request(url, headers=headers or {})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    list(text_string_to_metric_families(text))  # the page parses as Prometheus text
    samples = {}  # as Prometheus stores them (the parser above would rename Triton's)
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = tuple(sorted(LABEL.findall(match["labels"] or "")))
            samples[match["name"], labels] = float(match["value"])
    return text, samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), 0).save(buf, "PNG")
    return buf.getvalue()


def test_triton_counters_and_stepwise_histograms_follow_the_traffic(served):
    server, client, url = served
    _, before = scrape(url)
    for _ in range(3):
        client.classify(_png())
    with pytest.raises(grpc.RpcError):
        client.classify(b"not an image")  # counted as a failure of lenet5
    with pytest.raises(grpc.RpcError):
        list(client.generate_stream("KING.\n", model="nope"))
    for seed in (1, 2):
        last = list(client.generate_stream("KING.\n", max_tokens=12, seed=seed, min_tokens=12))
        assert last[-1].completion_tokens == 12
    text, after = scrape(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    lenet, lstm = dict(model="lenet5", version="1"), dict(model="char_lstm", version="1")
    assert "# TYPE nv_inference_request_success counter\n" in text  # Triton's form, no _total
    assert moved("nv_inference_request_success", **lenet) == 3
    assert moved("nv_inference_request_failure", **lenet) == 1
    assert moved("nv_inference_count", **lenet) == 3
    assert moved("nv_inference_exec_count", **lenet) >= 3
    assert moved("nv_inference_request_success", **lstm) == 2
    assert moved("nv_inference_exec_count", **lstm) >= 12  # graph runs of the batch
    assert moved("nv_inference_request_duration_us", **lstm) > 0
    assert moved("nv_inference_compute_infer_duration_us", **lstm) > 0
    rpc = "stepwise.v1.Inference/"
    assert moved("stepwise_requests_total", rpc=rpc + "Classify", code="OK") == 3
    assert moved("stepwise_requests_total", rpc=rpc + "Classify", code="INVALID_ARGUMENT") == 1
    assert moved("stepwise_requests_total", rpc=rpc + "Generate", code="NOT_FOUND") == 1
    assert moved("stepwise_request_duration_seconds_count", rpc=rpc + "Generate") == 3
    assert moved("stepwise_tokens_generated_total", model="char_lstm") == 24
    assert moved("stepwise_time_to_first_token_seconds_count", model="char_lstm") == 2
    assert moved("stepwise_inter_token_latency_seconds_count", model="char_lstm") == 22
    assert moved("stepwise_batch_size_count", model="char_lstm") >= 12
    assert value(after, "stepwise_live_streams", model="char_lstm") == 0


def test_live_streams_and_cancellations_show_while_they_happen(served):
    server, client, url = served
    stream = client.generate_stream("KING.\n", max_tokens=4000, min_tokens=4000)
    next(stream)  # running now
    _, during = scrape(url)
    assert value(during, "stepwise_live_streams", model="char_lstm") == 1
    stream.cancel()

    def cancelled():  # the server hears of the cancellation a moment later
        _, after = scrape(url)
        return value(after, "stepwise_requests_total", rpc="stepwise.v1.Inference/Generate",
                     code="CANCELLED")  # fmt: skip

    deadline = time.monotonic() + 10
    while cancelled() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled() >= 1


def test_only_metrics_is_served_and_auth_all_guards_it(repository):
    server, _ = create_server(
        loopback_config(
            repository, port=0, device="cpu", metrics_port=0,
            security=SecurityConfig(auth_token="tok", auth_all=True),
        )
    )  # fmt: skip
    server.start()
    try:
        url = f"http://127.0.0.1:{server.metrics_endpoint.port}"
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(url + "/other", {"Authorization": "Bearer tok"})
        assert info.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(url + "/metrics")
        assert info.value.code == 401
        _, samples = scrape(url + "/metrics", {"Authorization": "Bearer tok"})
        assert ("nv_inference_request_success", (("model", "lenet5"), ("version", "1"))) in samples
    finally:
        server.stop(None)


def test_pending_requests_gauge_counts_streams_waiting_for_a_row(repository):
    """Triton's nv_inference_pending_request_count: with one batch row, of three
    streams one runs and two wait."""
    config = loopback_config(
        repository, port=0, device="cpu", metrics_port=0, engine=EngineConfig(max_batch_size=1)
    )
    server, port = create_server(config)
    server.start()
    url = f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
    lstm = dict(model="char_lstm", version="1")
    try:
        with StepwiseClient(f"127.0.0.1:{port}", timeout=60) as client:
            streams = [
                client.generate_stream("KING.\n", max_tokens=4000, min_tokens=4000, seed=s)
                for s in range(3)
            ]
            seen, deadline = [], time.monotonic() + 20
            while time.monotonic() < deadline:
                _, samples = scrape(url)
                seen.append(value(samples, "nv_inference_pending_request_count", **lstm))
                if seen[-1] == 2:
                    break
                time.sleep(0.05)
            assert seen[-1] == 2, seen
            assert value(samples, "stepwise_live_streams", model="char_lstm") == 1
            for stream in streams:
                stream.cancel()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                _, samples = scrape(url)
                if value(samples, "nv_inference_pending_request_count", **lstm) == 0:
                    break
                time.sleep(0.05)
            assert value(samples, "nv_inference_pending_request_count", **lstm) == 0
            assert ("nv_inference_pending_request_count", tuple(sorted(
                dict(model="lenet5", version="1").items()))) in samples  # fmt: skip
    finally:
        server.stop(None)


def test_host_cpu_and_memory_as_triton_names_them(tmp_path, served):
    proc = tmp_path / "proc"
    proc.mkdir()
    meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n"
    (proc / "meminfo").write_text(meminfo)
    (proc / "stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n")
    host = HostUsage(proc)
    # 400 more jiffies, 100 of them idle or waiting on I/O: 75% busy since the last read
    (proc / "stat").write_text("cpu  300 0 200 780 120 0 0 0 0 0\ncpu0 1 2 3\n")
    figures = {name: v for name, _, v in host.read()}
    assert figures == {
        "nv_cpu_utilization": 0.75,
        "nv_cpu_memory_total_bytes": 1000 * 1024,
        "nv_cpu_memory_used_bytes": 750 * 1024,
    }
    assert {name: v for name, _, v in host.read()}["nv_cpu_utilization"] == 0.0  # no change
    assert HostUsage(tmp_path / "nowhere").read() == []  # no /proc: no CPU metrics
    _, _, url = served  # and the real server's page has them, from the real /proc
    text, samples = scrape(url)
    assert "# TYPE nv_cpu_utilization gauge\n" in text
    assert 0 <= value(samples, "nv_cpu_utilization") <= 1
    used, total = (
        value(samples, "nv_cpu_memory_used_bytes"),
        value(samples, "nv_cpu_memory_total_bytes"),
    )
    assert 0 < used < total
