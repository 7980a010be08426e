"""Coalesced streaming measured: Generate at several `stream_interval_ms`, one server.

    python -m bench.stream_interval                      # 0, 5, 20, 50 ms at 1, 16, 64 streams
    python -m bench.stream_interval --intervals 0,20 --duration 4

One `python -m serving` (loopback, the default repository) serves every run; each
interval is a request field, so the server's own default plays no part. For each
interval and each level of concurrent streams, `python -m loadtest` reports tokens/s,
tokens per message, the inter-token latency per token (a request's time after its
first token over its tokens), the client's longest waits between messages and the
server's CPU per 1,000 tokens. Printed as a table with each figure's ratio to the
first interval's at the same level (one run: the ratios are the figures to read).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parents[1]


def sweep(intervals, levels, duration: float, repository: Path, out: Path) -> dict:
    """{interval: [a loadtest level's figures, one per concurrency level]}."""
    figures = {}
    with harness.start(
        ["--model-repository", str(repository), "--no-request-log"], name="server",
        metrics_port=None, stop_timeout=60,
    ) as server:  # fmt: skip
        for ms in intervals:
            subprocess.run(
                [sys.executable, "-m", "loadtest", "--target", server.target, "--rpc",
                 "generate", "--model", "char_lstm", "--max-tokens", "256",
                 "--concurrency", ",".join(map(str, levels)), "--duration", str(duration),
                 "--warmup", "2", "--stream-interval-ms", str(ms), "--quiet",
                 "--server-pid", str(server.pid), "--output-dir", str(out / str(ms))],
                cwd=ROOT, stdout=subprocess.DEVNULL, check=True,
            )  # fmt: skip
            figures[ms] = json.loads((out / str(ms) / "results.json").read_text())["levels"]
    return figures


COLUMNS = (  # (heading, figure of a level)
    ("tokens/s", lambda v: v["tokens_per_s"]),
    ("tokens/msg", lambda v: v["tokens_per_message"]),
    ("ITL p50 us", lambda v: v["itl_us"]["p50"]),
    ("ITL p99 us", lambda v: v["itl_us"]["p99"]),
    ("TTFT p50 us", lambda v: v["ttft_us"]["p50"]),
    ("msg gap p99 us", lambda v: v["message_gap_us"]["p99"]),
    ("CPU s/1k tok", lambda v: v["server_cpu_s_per_1k_tokens"]),
)


def table(figures: dict, levels) -> str:
    first = next(iter(figures))
    rows = ["| interval ms | streams | " + " | ".join(h for h, _ in COLUMNS) + " |"]
    rows.append("|" + " --- |" * (2 + len(COLUMNS)))
    for ms, runs in figures.items():
        for i, level in enumerate(levels):
            cells = []
            for _, value in COLUMNS:
                x, base = value(runs[i]), value(figures[first][i])
                cells.append(f"{x:.4g} ({x / base:.2f}x)" if base else f"{x:.4g}")
            rows.append(f"| {ms} | {level} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--intervals", default="0,5,20,50", help="stream_interval_ms values")
    p.add_argument("--levels", default="1,16,64", help="concurrent streams")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per level")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    intervals = [int(x) for x in args.intervals.split(",")]
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        figures = sweep(intervals, levels, args.duration, args.model_repository, Path(tmp))
    print(table(figures, levels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
