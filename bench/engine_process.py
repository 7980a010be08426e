"""The process layouts measured: one server with `--engine-process off` against one
with `--engine-process on` (and, asked for, `--frontends 2`), in alternating rounds.

    python -m bench.engine_process                      # 2 rounds, Generate 1/16/64, Classify 1/4
    python -m bench.engine_process --rounds 1 --duration 4
    python -m bench.engine_process --layouts off,frontends2 --generate 16,64 --classify 1,4,8

Each round starts `python -m serving` (loopback, the default repository) once per
layout, in turn, and runs `python -m loadtest` against it: Generate (char_lstm, 256
tokens, the server's default stream interval) at 1, 16 and 64 streams, and Classify
(lenet5) at 1 and 4 clients. The server's CPU counts its child processes too (the engine
process, the frontends: loadtest's --server-pid adds them). Printed: each figure's
median over the rounds for each layout, and each layout's ratio to the first (one run:
the ratios are the figures to read); then Generate against the limit, the same step
graph run in this process at the same batch (`bench.inprocess`, measured in every
round): served tokens/s over in-process tokens/s, and the server's CPU per token over
one batch-1 step's time (issue 20's targets: >= 0.4 at 16 and 64 streams, <= 3x at 1
stream).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from bench import harness, inprocess, perf

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name -> the server's flags
    "off": ["--engine-process", "off"],
    "on": ["--engine-process", "on"],
    "frontends2": ["--frontends", "2"],
    "batch8": ["--max-batch-size", "8"],  # dynamic batching of classifiers
    "frontends2-batch8": ["--frontends", "2", "--max-batch-size", "8"],
}

LOADS = {  # name -> (loadtest arguments, figures read: (heading, figure of a level))
    "generate": (
        ["--rpc", "generate", "--model", "char_lstm", "--max-tokens", "256"],
        (
            ("tokens/s", lambda v: v["tokens_per_s"]),
            ("TTFT p50 us", lambda v: v["ttft_us"]["p50"]),
            ("ITL p99 us", lambda v: v["itl_us"]["p99"]),
            ("CPU s/1k tok", lambda v: v["server_cpu_s_per_1k_tokens"]),
        ),
    ),
    # KServe ModelInfer under NVIDIA's perf_analyzer (bench.perf), zeros as input
    **{
        f"modelinfer-{model}": (
            model,
            (("infer/s", lambda v: v["infer_per_s"]), ("p99 us", lambda v: v["p99_us"])),
        )
        for model in ("lenet5", "resnet18")
    },
    "classify": (
        ["--rpc", "classify", "--model", "lenet5"],
        (
            ("req/s", lambda v: v["throughput_rps"]),
            ("p99 us", lambda v: v["latency_us"]["p99"]),
            ("CPU ms/req", lambda v: v["server_cpu_s_per_request"] * 1000),
        ),
    ),
}


def one_run(
    layout: str, loads: dict, duration: float, repository: Path, out: Path, base: Path | None
) -> dict:
    """{load: [a loadtest level's figures, one per level]} for one server."""
    figures = {}
    metrics_port = harness.free_port()
    flags = LAYOUTS[layout] if layout != "base" else []
    with harness.start(
        ["--model-repository", str(repository), "--no-request-log", *flags],
        name=f"server ({layout})", metrics_port=metrics_port, stop_timeout=60,
        cwd=base if layout == "base" else ROOT,
    ) as server:  # fmt: skip
        if "--frontends" in flags:  # health answers once the first serves
            count = flags[flags.index("--frontends") + 1]
            harness.until("every frontend serving", lambda: _frontends(metrics_port, count), 120)
        for load, levels in loads.items():
            if load.startswith("modelinfer-"):
                model = LOADS[load][0]  # each client its own connection, as loadtest's
                run = perf.measure(server.target, model, levels, 3000, False, own_connections=True)
                if "error" in run:
                    raise RuntimeError(f"perf_analyzer: {run['error']}")
                figures[load] = run["levels"]
                continue
            where = out / f"{layout}-{load}"
            subprocess.run(
                [sys.executable, "-m", "loadtest", "--target", server.target, *LOADS[load][0],
                 "--concurrency", ",".join(map(str, levels)), "--duration", str(duration),
                 "--warmup", "2", "--quiet", "--server-pid", str(server.pid),
                 "--output-dir", str(where)],
                cwd=ROOT, stdout=subprocess.DEVNULL, check=True,
            )  # fmt: skip
            figures[load] = json.loads((where / "results.json").read_text())["levels"]
    return figures


def _frontends(metrics_port: int, count: str) -> bool:
    """Whether the supervisor's page says `count` frontends answered."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        page = response.read().decode()
    return f"\nstepwise_frontends {count}\n" in f"\n{page}"


def table(runs: dict[str, list[dict]], loads: dict) -> str:
    layouts = list(runs)
    ratios = [f"{layout} / {layouts[0]}" for layout in layouts[1:]]
    rows = [" | ".join(["| load | level | figure", *layouts, *ratios]) + " |"]
    rows.append("|" + " --- |" * (3 + len(layouts) + len(ratios)))
    for load, levels in loads.items():
        for i, level in enumerate(levels):
            for heading, value in LOADS[load][1]:
                medians = [
                    statistics.median(value(r[load][i]) for r in runs[lay]) for lay in layouts
                ]
                cells = [f"{m:.4g}" for m in medians]
                cells += [f"{m / medians[0]:.2f}x" if medians[0] else "-" for m in medians[1:]]
                rows.append(f"| {load} | {level} | {heading} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def limits(runs: dict[str, list[dict]], limit: list[list[dict]], levels: list[int]) -> str:
    """Generate's figures over the in-process step graph's (medians over the rounds)."""
    rows = ["| layout | streams | tokens/s / in process, same batch | CPU/token / batch-1 step |"]
    rows.append("|" + " --- |" * 4)
    step_us = statistics.median(r[0]["us_per_call"] for r in limit)
    for layout in runs:
        for i, level in enumerate(levels):
            served = statistics.median(r["generate"][i]["tokens_per_s"] for r in runs[layout])
            cpu = statistics.median(
                r["generate"][i]["server_cpu_s_per_1k_tokens"] for r in runs[layout]
            )
            batch = statistics.median(r[i]["tokens_per_s"] for r in limit)
            rows.append(
                f"| {layout} | {level} | {served / batch:.3f} | {cpu * 1e3 / step_us:.2f}x |"
            )
    return f"In process: one batch-1 step {step_us:.0f} us.\n\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--generate", default="1,16,64", help="concurrent streams ('' to skip)")
    p.add_argument("--classify", default="1,4", help="concurrent clients ('' to skip)")
    p.add_argument(
        "--modelinfer",
        default="",
        help="concurrencies of perf_analyzer's ModelInfer on lenet5 and resnet18, two at "
        "most (e.g. 1,8; default '': none)",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument(
        "--layouts",
        default="off,on",
        help=f"of {', '.join(LAYOUTS)}, and base with --base; ratios to the first",
    )
    p.add_argument(
        "--base",
        type=Path,
        help="a checkout (e.g. a git worktree of an older commit) to start as the layout "
        "'base', with its own defaults",
    )
    args = p.parse_args()
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS) - ({"base"} if args.base else set())
    if unknown or len(layouts) < 2:
        p.error(f"--layouts: two or more of {', '.join(LAYOUTS)}, not {args.layouts}")
    given = [("generate", args.generate), ("classify", args.classify)]
    given += [(f"modelinfer-{m}", args.modelinfer) for m in ("lenet5", "resnet18")]
    loads = {load: [int(x) for x in levels.split(",")] for load, levels in given if levels}
    runs: dict[str, list[dict]] = {layout: [] for layout in layouts}
    limit: list[list[dict]] = []  # the step graph in process, once per round
    step = args.model_repository / "char_lstm" / "1"
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            if "generate" in loads:
                limit.append(inprocess.step_graph(step, loads["generate"], 2.0))
            for layout in layouts:
                runs[layout].append(
                    one_run(
                        layout, loads, args.duration, args.model_repository, Path(tmp), args.base
                    )
                )
    print(table(runs, loads))
    if "generate" in loads:
        print()
        print(limits(runs, limit, loads["generate"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
