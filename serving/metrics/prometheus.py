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

import logging
import threading
from pathlib import Path

from prometheus_client import (
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
            return engine.occupancy()[1]
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

    def tokens(self, gaps: list[float]) -> None:
        for gap in gaps:
            self._itl.observe(gap)
        self._tokens.inc(len(gaps))


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
            running, waiting = engine.occupancy()
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
