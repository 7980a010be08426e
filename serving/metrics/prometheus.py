"""Prometheus metrics on `--metrics-port` (default 8002), path `/metrics`.

Two sources, one page:
- Triton's per-model counters, with Triton's names and `model`/`version` labels so its
  dashboards work unchanged, read at scrape time from `serving.metrics.statistics` (the same
  numbers KServe's ModelStatistics reports): `nv_inference_request_success`,
  `nv_inference_request_failure`, `nv_inference_count`, `nv_inference_exec_count`,
  `nv_inference_request_duration_us`, `nv_inference_queue_duration_us`,
  `nv_inference_compute_{input,infer,output}_duration_us`; and Triton's gauges
  `nv_inference_pending_request_count` (per model) and `nv_cpu_utilization`,
  `nv_cpu_memory_{total,used}_bytes` (the host, from /proc). Written in Triton's exact
  form (counters without a `_total` suffix), which `prometheus_client` would rename.
- stepwise's own, with `prometheus_client`: requests by RPC and status code and their
  latency, and per step model the time to first token, the inter-token latency and the
  batch size per iteration (histograms), tokens generated, live streams and queue depth.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

disable_created_metrics()  # no `_created` series: Triton's dashboards do not use them

log = logging.getLogger(__name__)

# (name, help, the value from a statistics Snapshot)
TRITON_COUNTERS = (
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (a request of batch n counts n)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (a batch counts once)",
     lambda s: s.execution_count),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     lambda s: (s.success.ns + s.fail.ns) // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     lambda s: s.phases["queue"].ns // 1000),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds", lambda s: s.phases["input"].ns // 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds",
     lambda s: s.phases["infer"].ns // 1000),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds",
     lambda s: s.phases["output"].ns // 1000),
)  # fmt: skip
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Every metric of one server. `models` is the model registry (names, versions),
    `statistics` the per-model counters, `engines` the step models' schedulers;
    `prometheus` is the Prometheus collector registry the metrics live in."""

    def __init__(self, models, statistics, engines: dict | None = None, batchers=None):
        self.model_registry, self.statistics = models, statistics
        self.engines = engines if engines is not None else {}
        self.batchers = batchers if batchers is not None else {}
        self.host = HostUsage()
        self.prometheus = CollectorRegistry()
        r = self.prometheus
        self.requests = Counter(
            "stepwise_requests", "RPCs answered, by RPC and status code", ["rpc", "code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "stepwise_request_duration_seconds",
            "RPC duration from arrival to its status (a stream: to its last message)",
            ["rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "stepwise_time_to_first_token_seconds",
            "From a stream's arrival to its first sampled token (queue and prompt included)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "stepwise_inter_token_latency_seconds",
            "Time between a stream's consecutive tokens, as the engine produced them",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch = Histogram(
            "stepwise_batch_size", "Streams stepped together per decode iteration",
            ["model"], buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "stepwise_tokens_generated", "Tokens sampled, by model", ["model"], registry=r
        )
        r.register(_EngineGauges(self.engines))

    def watch_slots(self, pools: dict) -> None:
        """Stream slots by pool (`serving.api.streams.StreamSlots`): live and waiting."""
        self.prometheus.register(_SlotGauges(pools))

    def engine_observer(self, model: str) -> EngineMetrics:
        return EngineMetrics(self, model, self.statistics[model])

    def pending(self, name: str) -> int:
        """Requests of `name` waiting to run: streams waiting for a batch row, or rows
        queued for the dynamic batcher."""
        engine, batcher = self.engines.get(name), self.batchers.get(name)
        if engine is not None:
            return engine.scheduler.occupancy()[1]
        return batcher.pending() if batcher is not None else 0

    def triton_text(self) -> str:
        """Triton's metrics in the Prometheus text format, as Triton writes them."""
        rows = []
        for name, model in sorted(self.model_registry.models.items()):
            snapshot = self.statistics[name].snapshot()
            labels = f'model="{_label(name)}",version="{_label(model.version)}"'
            rows.append((labels, name, snapshot))
        out = []
        for metric, help_text, value in TRITON_COUNTERS:
            out.append(f"# HELP {metric} {help_text}\n# TYPE {metric} counter\n")
            out.extend(f"{metric}{{{labels}}} {value(s)}\n" for labels, _, s in rows)
        metric = "nv_inference_pending_request_count"
        out.append(
            f"# HELP {metric} Instantaneous number of pending requests awaiting execution "
            f"per-model.\n# TYPE {metric} gauge\n"
        )
        out.extend(f"{metric}{{{labels}}} {self.pending(name)}\n" for labels, name, _ in rows)
        for metric, help_text, value in self.host.read():
            out.append(f"# HELP {metric} {help_text}\n# TYPE {metric} gauge\n{metric} {value}\n")
        return "".join(out)

    def render(self) -> bytes:
        return self.triton_text().encode() + generate_latest(self.prometheus)


class EngineMetrics:
    """What one step model's scheduler reports (`serving.engine.EngineObserver`)."""

    def __init__(self, metrics: Metrics, model: str, statistics):
        self._statistics = statistics  # Triton's execution count and batch sizes
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self._batch = metrics.batch.labels(model)
        self._tokens = metrics.tokens.labels(model)

    def run(self, graph: str, rows: int, seconds: float) -> None:
        self._statistics.execution(rows, int(seconds * 1e9))
        if graph == "step":
            self._batch.observe(rows)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self._tokens.inc()

    def token(self, gap_seconds: float) -> None:
        self._itl.observe(gap_seconds)
        self._tokens.inc()


class HostUsage:
    """Triton's CPU metrics, from /proc (Linux; elsewhere none): the CPU utilization of
    the whole machine since the previous scrape (0.0-1.0, all cores together) and its
    memory, total and used (total less what the kernel calls available)."""

    def __init__(self, proc: Path = Path("/proc")):
        self.proc = proc
        self._lock = threading.Lock()
        self._last = self._cpu_times()

    def _cpu_times(self) -> tuple[int, int] | None:
        """(idle, total) jiffies of all cores, or None without /proc/stat."""
        try:
            fields = (self.proc / "stat").read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return ticks[3] + ticks[4], sum(ticks)

    def read(self) -> list[tuple[str, str, float | int]]:
        out = []
        now = self._cpu_times()
        with self._lock:
            last, self._last = self._last, now
        if now is not None and last is not None:
            idle, total = now[0] - last[0], now[1] - last[1]
            busy = 1 - idle / total if total > 0 else 0.0
            out.append(("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]",
                        round(min(max(busy, 0.0), 1.0), 4)))  # fmt: skip
        try:
            info = dict(
                line.split(":", 1) for line in (self.proc / "meminfo").read_text().splitlines()
            )
            total_kb = int(info["MemTotal"].split()[0])
            available_kb = int(info["MemAvailable"].split()[0])
        except (OSError, KeyError, ValueError):
            return out
        out.append(("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes",
                    total_kb * 1024))  # fmt: skip
        out.append(("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes",
                    (total_kb - available_kb) * 1024))  # fmt: skip
        return out


class _EngineGauges:
    """Live streams and queue depth per step model, read at scrape time."""

    def __init__(self, engines: dict):
        self.engines = engines

    def collect(self):
        live = GaugeMetricFamily(
            "stepwise_live_streams", "Streams in the continuous batch", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "stepwise_queue_depth", "Streams waiting for a batch row", labels=["model"]
        )
        for name, engine in sorted(self.engines.items()):
            running, waiting = engine.scheduler.occupancy()
            live.add_metric([name], running)
            queued.add_metric([name], waiting)
        yield live
        yield queued


class _SlotGauges:
    """Streams holding a slot and waiting for one, per pool, read at scrape time."""

    def __init__(self, pools: dict):
        self.pools = pools

    def collect(self):
        slots = GaugeMetricFamily(
            "stepwise_stream_slots",
            "Response streams holding a slot (live) or waiting for one (waiting), by pool",
            labels=["pool", "state"],
        )
        for pool, streams in sorted(self.pools.items()):
            slots.add_metric([pool, "live"], streams.live)
            slots.add_metric([pool, "waiting"], streams.waiting)
        yield slots


# -- the HTTP endpoint ------------------------------------------------------------------

# Each metrics connection holds a thread and a descriptor of the process the gRPC port
# also draws on; uncapped, held sockets once used up the descriptor limit and new gRPC
# clients timed out. Prometheus opens one connection per scrape, so a few slots serve
# every scraper there is; a connection past them is closed as soon as it is accepted.
MAX_METRICS_CONNECTIONS = 16
# From accept to the end of the request's headers (with TLS, the handshake first): a
# scraper sends them at once, so this only ever ends a stalled or trickling client.
HEADER_TIMEOUT_S = 5.0
# Queued connections cost the kernel a little, not the process a descriptor; a burst of
# scrapers (or of refused clients reconnecting) waits here instead of SYN retries.
LISTEN_BACKLOG = 128
REFUSAL_LOG_INTERVAL_S = 60.0  # at most one warning a minute, however many are refused


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's threaded server with a cap on live connections and a deadline for each
    connection's request headers (`_QuietHandler` reports when they are in)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, max_connections: int, header_timeout_s: float):
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.active = 0  # connections accepted whose thread has not ended
        self.refused = 0  # connections closed at accept, the cap being reached
        self._refused_unlogged, self._logged_at = 0, None
        self._lock = threading.Lock()
        # connection -> monotonic deadline for its headers; popped, under the lock, before
        # the connection is closed, so `service_actions` never touches a reused descriptor.
        self._deadlines: dict = {}
        super().__init__(address, handler)

    def verify_request(self, request, client_address) -> bool:
        """Within the cap, a slot and a deadline; past it, False: the caller closes the
        connection at once and no thread is started."""
        with self._lock:
            if self.active < self.max_connections:
                self.active += 1
                self._deadlines[request] = time.monotonic() + self.header_timeout_s
                return True
            self.refused += 1
            self._refused_unlogged += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "metrics: refused %d connection(s) (%d since start): max_connections=%d "
                "already open", self._refused_unlogged, self.refused, self.max_connections,
            )  # fmt: skip
            self._refused_unlogged, self._logged_at = 0, now
        return False

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the caller closes the connection)
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1

    def headers_read(self, request) -> None:
        with self._lock:
            self._deadlines.pop(request, None)

    def shutdown_request(self, request) -> None:
        self.headers_read(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Runs on serve_forever's loop between accepts: disconnects every connection past
        its header deadline. Shutting the descriptor down wakes the thread blocked reading
        it; the thread then closes it and frees the slot. (socket.socket's shutdown, not
        SSLSocket's: that one drops the TLS state under the reading thread's feet.)"""
        now = time.monotonic()
        with self._lock:
            for request, deadline in list(self._deadlines.items()):
                if now >= deadline:
                    del self._deadlines[request]
                    try:
                        socket.socket.shutdown(request, socket.SHUT_RDWR)
                    except OSError:  # the client hung up first
                        pass

    def handle_error(self, request, client_address) -> None:
        """A client that failed the TLS handshake or hung up: one debug line, not a
        traceback on stderr per bad connection (Prometheus' targets page shows its
        own side)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # ssl.SSLError, timeouts and resets included
            log.debug("metrics: %s from %s: %s", type(exc).__name__, client_address[0], exc)
        else:
            log.exception("metrics: error answering %s", client_address[0])


class _QuietHandler(WSGIRequestHandler):
    # Seconds a connection may sit silent holding a thread once its headers are in (the
    # header deadline bounds the time before); the response is written under it too.
    timeout = 10

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.server.headers_read(self.request)
        return ok

    def log_message(self, *args) -> None:  # one line per scrape would drown the logs
        pass


class MetricsEndpoint:
    """`GET /metrics` on its own port and thread; with a token, only with
    `Authorization: Bearer <token>` (the server's --auth-all); with an `ssl_context`,
    over HTTPS only (the TLS handshake runs on the request's thread, so a client that
    stalls it holds no one else up). At most `max_connections` at once, each with
    `header_timeout_s` to send its request line and headers."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int = MAX_METRICS_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
    ):
        if max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, got {max_connections}")
        if not header_timeout_s > 0:
            raise ValueError(f"header_timeout_s: must be above 0, got {header_timeout_s}")
        expected = f"Bearer {token}".encode() if token else None

        def app(environ, start_response):
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if expected is not None and not hmac.compare_digest(given, expected):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"authorization: missing or wrong bearer token\n"]
            body = metrics.render()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]

        self.httpd = _Server((host, port), _QuietHandler, max_connections, header_timeout_s)
        self.httpd.set_app(app)
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = self.httpd.server_port
        # Deadlines are checked once per poll, so a short timeout polls more often.
        poll_s = min(0.5, header_timeout_s / 4)
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(poll_s,), name="metrics", daemon=True
        )

    @property
    def active(self) -> int:
        """Connections being served now (each holds a thread and a descriptor)."""
        return self.httpd.active

    @property
    def refused(self) -> int:
        """Connections closed at accept since the start, the cap being reached."""
        return self.httpd.refused

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a loop that never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()
