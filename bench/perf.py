"""NVIDIA's perf_analyzer against stepwise's KServe port, beside the project's own load
generator at the same models and levels (issue 18).

perf_analyzer comes from tools/perf_analyzer.sh (tritonclient 2.41.1's wheel, fetched
into .cache/ on first use); where it cannot be had, the section says why and the bench
goes on. It sends zeros (`--input-data zero`: its random floats include NaN, which the
server refuses, and token 0 is a valid id), one concurrency level per window set, and
reports the server's own breakdown read from ModelStatistics.
"""

from __future__ import annotations

import csv
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "perf_analyzer.sh"
UNAVAILABLE = 3  # the tool's exit status when perf_analyzer cannot be had here
CLASSIFIER_LEVELS = [1, 8]
SEQUENCE_LEVELS = [4, 16]
SEQUENCE_LENGTH = 64
# Triton 2.51 with its ONNX Runtime backend on the same `make models` repository, same
# perf_analyzer flags, one run each on a loaded 2-core machine like this one (checked on
# 2026-12-05; issue 18 cites them; Triton's backend is on no registry reachable here, so
# the bench cannot re-run them): model -> concurrency -> infer/s.
TRITON = {
    "lenet5": {1: 3785, 8: 3748},
    "resnet18": {1: 1376, 8: 1477},
    "char_lstm": {4: 4590},  # 4 sequences x 32 steps, implicit state
}
# CSV column -> our key (microseconds but for the rate)
COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_input_us",
    "Server Compute Infer": "server_infer_us",
    "Server Compute Output": "server_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p99 latency": "p99_us",
}


def unavailable() -> str | None:
    """Why perf_analyzer cannot run here, or None once it is fetched and runs."""
    done = subprocess.run(
        ["bash", str(TOOL), "--fetch"], capture_output=True, text=True, timeout=600
    )
    if done.returncode == 0:
        return None
    reason = (done.stderr or done.stdout).strip().splitlines()
    return reason[-1] if reason else f"tools/perf_analyzer.sh exited {done.returncode}"


def command(model: str, levels: list[int], window_ms: int, sequence: bool) -> list[str]:
    """perf_analyzer's flags for one model (the server address and report file apart)."""
    flags = ["-i", "grpc", "-m", model, "--input-data", "zero", "-p", str(window_ms)]
    low, high = min(levels), max(levels)  # two levels: low:high with step high - low
    flags += ["--concurrency-range", f"{low}:{high}:{max(1, high - low)}"]
    if sequence:
        flags += ["--sequence-length", str(SEQUENCE_LENGTH), "--sequence-length-variation", "0"]
    return flags


# Triton's C++ client shares one gRPC channel (one connection) among up to this many of
# perf_analyzer's concurrent contexts unless told otherwise; 1: each has its own, as
# separate clients would (what `--frontends N` spreads: connections, not calls).
SHARE_COUNT = "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"


def measure(
    target: str,
    model: str,
    levels: list[int],
    window_ms: int,
    sequence: bool,
    own_connections: bool = False,
) -> dict:
    """One perf_analyzer run: {"command", "levels": [per concurrency]} or {"error"}.
    `own_connections`: each concurrent context on a connection of its own."""
    flags = command(model, levels, window_ms, sequence)
    env = dict(os.environ, **({SHARE_COUNT: "1"} if own_connections else {}))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.csv"
        done = subprocess.run(
            ["bash", str(TOOL), "-u", target, *flags, "-f", str(report)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        shown = ("SHARE_COUNT=1 " if own_connections else "") + "perf_analyzer " + " ".join(flags)
        shown = shown.replace("SHARE_COUNT", SHARE_COUNT)
        if done.returncode != 0 or not report.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return {"command": shown, "error": " / ".join(tail)[:400]}
        with report.open() as f:
            rows = [
                {key: float(row[column]) for column, key in COLUMNS.items()}
                for row in csv.DictReader(f)
            ]
    for row in rows:
        row["concurrency"] = int(row["concurrency"])
    return {"command": shown, "levels": sorted(rows, key=lambda r: r["concurrency"])}
