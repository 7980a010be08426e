"""Per-RPC metrics: every call counted by its final status code and timed, a watcher
of `serving.api.calls.Calls` writing to `serving.metrics.prometheus.Metrics`."""

from __future__ import annotations

import time

from serving.api.calls import RpcWatch
from serving.metrics.prometheus import Metrics


class RpcMetrics:
    """Counts every RPC by its final status code and times it (a watcher of
    `serving.api.calls.Calls`)."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def starter(self, details, handler):
        rpc = details.method.lstrip("/")
        return lambda _request, _context: _Timed(self.metrics, rpc)


class _Timed(RpcWatch):
    def __init__(self, metrics: Metrics, rpc: str):
        self.metrics, self.rpc, self.start = metrics, rpc, time.perf_counter()

    def done(self, code: str) -> None:
        self.metrics.requests.labels(self.rpc, code).inc()
        self.metrics.latency.labels(self.rpc).observe(time.perf_counter() - self.start)
