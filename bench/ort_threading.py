"""ONNX Runtime's threading for the served graphs, measured: intra-op threads and spinning.

    python -m bench.ort_threading                 # 2 rounds of 3 variants, about 4 min
    python -m bench.ort_threading --rounds 1 --duration 3

Variants (server flags): `pool` (the defaults: one thread per physical core, spinning
between runs), `pool-calm` (`--no-intra-op-spinning`: the pool's threads sleep) and
`single` (`--intra-op-threads 1`: each run on its calling thread, no pool, so nothing
to spin). Each round starts each variant in turn (the order flips every round) and
loads it with `python -m loadtest`: Generate char_lstm at 1 and at 64 streams (the step
graph at 1 and at 64 rows, 256 tokens, stream_interval_ms 0 so every token is a
message as before) and Classify lenet5 and resnet18 at one client (PNG). Then the
server idles 3 s: its CPU then is what spinning costs a server with nothing to do.
Prints each variant's means and their ratios to the first variant's: throughput and
the server's CPU per token or per request (its process CPU time, ORT's threads
included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness
from loadtest.__main__ import server_cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "pool": [],
    "pool-calm": ["--no-intra-op-spinning"],
    "single": ["--intra-op-threads", "1"],
}


def loads(duration: float) -> dict[str, tuple[list[str], tuple[str, str]]]:
    """name -> (loadtest arguments, (throughput figure, CPU figure))."""
    gen = [
        "--rpc",
        "generate",
        "--model",
        "char_lstm",
        "--max-tokens",
        "256",
        "--stream-interval-ms",
        "0",
        "--duration",
        str(duration),
        "--warmup",
        "2",
    ]
    cls = ["--rpc", "classify", "--input-data", "digits", "--concurrency", "1",
           "--duration", str(duration), "--warmup", "1"]  # fmt: skip
    per_token = ("tokens_per_s", "server_cpu_s_per_1k_tokens")
    per_request = ("throughput_rps", "server_cpu_s_per_request")
    return {
        "generate x1": ([*gen, "--concurrency", "1"], per_token),
        "generate x64": ([*gen, "--concurrency", "64"], per_token),
        "classify lenet5": ([*cls, "--model", "lenet5"], per_request),
        "classify resnet18": ([*cls, "--model", "resnet18"], per_request),
    }


def one_run(flags: list[str], repository: Path, duration: float, out: Path) -> dict:
    figures = {}
    with harness.start(
        ["--model-repository", str(repository), "--no-request-log", *flags],
        name="server", metrics_port=None, stop_timeout=60,
    ) as server:  # fmt: skip
        for name, (args, keys) in loads(duration).items():
            subprocess.run(
                [sys.executable, "-m", "loadtest", "--target", server.target, "--quiet",
                 "--server-pid", str(server.pid), "--output-dir", str(out / name), *args],
                cwd=ROOT, stdout=subprocess.DEVNULL, check=True,
            )  # fmt: skip
            level = json.loads((out / name / "results.json").read_text())["levels"][0]
            figures[name] = {key: level[key] for key in keys}
        time.sleep(1)  # the last streams' ends
        before = server_cpu_seconds(server.pid)
        time.sleep(3)
        figures["idle"] = {"server_cpu_cores": (server_cpu_seconds(server.pid) - before) / 3}
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]
            for name in order:
                out = Path(tmp) / f"{name}-{r}"
                runs[name].append(one_run(VARIANTS[name], args.model_repository,
                                          args.duration, out))  # fmt: skip
                print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    first = next(iter(VARIANTS))
    print(f"\nmeans of {args.rounds} run(s) each (ratio to {first}):")
    print("| load | figure | " + " | ".join(VARIANTS) + " |")
    print("|" + " --- |" * (2 + len(VARIANTS)))
    for load, keys in runs[first][0].items():
        for key in keys:
            base = statistics.fmean(run[load][key] for run in runs[first])
            cells = []
            for name in VARIANTS:
                mean = statistics.fmean(run[load][key] for run in runs[name])
                cells.append(f"{mean:.4g} ({mean / base:.2f}x)" if base else f"{mean:.4g}")
            print(f"| {load} | {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
