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
import urllib.request
from collections.abc import Callable
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
    """The other frontends' statistics, read when asked: `own_port()` is this frontend's
    metrics port (left out)."""

    def __init__(self, directory: str, own_port: Callable[[], int | None]):
        self.path, self.own_port = Path(directory) / FILE, own_port

    def ports(self) -> list[int]:
        try:
            ports = json.loads(self.path.read_text())["metrics_ports"]
        except (OSError, ValueError, KeyError):
            return []
        return [port for port in ports if port != self.own_port()]

    def statistics(self) -> list[bytes]:
        """Each other frontend's serialized ModelStatisticsResponse (one that does not
        answer in TIMEOUT_S is left out, and logged)."""
        out = []
        for port in self.ports():
            try:
                url = f"http://127.0.0.1:{port}/statistics"
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                    out.append(response.read())
            except OSError as exc:
                log.warning("statistics: the frontend on loopback port %d did not answer: %s",
                            port, exc)  # fmt: skip
        return out
