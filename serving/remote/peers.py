"""How a frontend of several (`--frontends N`) reaches the others: their loopback
metrics ports, in a file its supervisor keeps beside the engine process's socket.

KServe's ModelStatistics is answered by whichever frontend takes the call; it adds the
other frontends' counts (`/statistics` on their loopback ports: a serialized
ModelStatisticsResponse of their own), so every frontend answers for the whole server,
as NVIDIA's perf_analyzer and Triton's clients expect: they compare the counts of two
calls that may land on different frontends."""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "frontends.json"
TIMEOUT_S = 2.0


def write(directory: str, ports: list[int]) -> None:
    """The frontends' loopback metrics ports, replaced at once (readers see the old list
    or the new one, never half of one)."""
    path = Path(directory) / FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"metrics_ports": ports}))
    os.replace(partial, path)


class Peers:
    """The other frontends' statistics, read when asked: `own_port` is this frontend's
    metrics port (left out).

    This frontend's counts never go down from one answer to the next: a frontend that
    does not answer counts with its last answer, and one that is gone (restarted: a new
    port) keeps its last answer in the sum, as the supervisor's /metrics carries its
    counters. A frontend started again knows nothing of the ones before it: its answers
    start lower, as a restarted Triton's do."""

    def __init__(self, directory: str, own_port: int):
        self.path, self.own_port = Path(directory) / FILE, own_port
        self._last: dict[int, bytes] = {}  # port -> its latest answer
        self._lock = threading.Lock()
        self._fetchers = ThreadPoolExecutor(8, thread_name_prefix="peers")

    def ports(self) -> list[int]:
        try:
            ports = json.loads(self.path.read_text())["metrics_ports"]
        except (OSError, ValueError, KeyError):
            return []
        return [port for port in ports if port != self.own_port]

    def statistics(self) -> list[bytes]:
        """Each other frontend's serialized ModelStatisticsResponse, fetched together
        within TIMEOUT_S (one that does not answer: its last, and a warning)."""
        ports = self.ports()
        fetches = {
            port: self._fetchers.submit(fetch, port, "/statistics", TIMEOUT_S) for port in ports
        }
        wait(fetches.values(), timeout=TIMEOUT_S)
        with self._lock:
            for port, answer in fetches.items():
                try:
                    self._last[port] = answer.result(timeout=0)
                except Exception as exc:  # noqa: BLE001 - its last answer stands in
                    log.warning("statistics: the frontend on loopback port %d did not "
                                "answer: %s", port, exc)  # fmt: skip
            return list(self._last.values())


# Loopback only: never through a proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(port: int, path: str, timeout_s: float) -> bytes:
    """GET http://127.0.0.1:PORT/PATH: a frontend's loopback endpoint (OSError if it does
    not answer in `timeout_s`)."""
    with _OPENER.open(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
        return response.read()
