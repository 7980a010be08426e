"""python -m bench [--quick] [--only held]: stepwise against its limits, side by side, in one run.

- the limit: each default model's graphs in process on ONNX Runtime;
- the transport ceiling: the same service answering at once (bench.echo_server);
- stepwise served: `python -m serving`, measured by `python -m loadtest`;
- the baseline: the same PyTorch models in eager mode behind a plain servicer
  (bench.baseline_server);
- step-wise against recompute: a step graph with carried state against re-running
  the prefix for every token;
- held: Health/Check latency with 256 Generate streams open, and the server's RSS
  over 20,000 requests after a warm-up (bench.held);
- perf: NVIDIA's perf_analyzer on the KServe port beside `python -m loadtest` at the
  same models and levels (bench.perf).
`--only held` or `--only perf` runs just that section and merges it into the last
run's bench.json.

Writes the tables, with ratios from this one run, between the markers in
docs/BENCHMARKS.md, copies the plots to docs/bench/, and keeps the raw results under
bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import grpc
import onnxruntime

from bench import harness, held, inprocess, perf
from loadtest.__main__ import main as loadtest

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
STEP_MODELS = ["char_lstm", "char_gru", "char_rnn", "captioner"]
CLASSIFIERS = ["lenet5", "resnet18", "seq_digits"]


def start_server(name: str, argv: list[str], log: Path) -> harness.Server:
    """`python -m ARGV` on a loopback port, its output in `log`; ready when health says
    SERVING (`serving`) or, for the bench servers, which serve no health, when its port
    accepts gRPC. No Prometheus port: servers run side by side here."""
    module, *args = argv
    ready = harness.health_serving if module == "serving" else harness.connects
    return harness.start(
        args, module=module, name=f"{name} server", log=log, ready=ready, timeout=180,
        stop_timeout=40,
    )  # fmt: skip


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
    }


def load(
    server: harness.Server, name: str, out: Path, argv: list[str], timing: list[str]
) -> list[dict]:
    """One loadtest sweep against a server; its levels."""
    directory = out / name
    command = [
        "--target",
        server.target,
        "--server-pid",
        str(server.proc.pid),
        "--output-dir",
        str(directory),
        "--quiet",
        *timing,
        *argv,
    ]
    print(f"  {name}: python -m loadtest {' '.join(command)}", flush=True)
    status = loadtest(command)
    results = json.loads((directory / "results.json").read_text())
    if status != 0:  # no half-measured level goes into the document unnoticed
        raise RuntimeError(f"{name}: python -m loadtest failed: {results.get('error')}")
    for level in results["levels"]:
        level["command"] = "python -m loadtest " + " ".join(argv)
    return results["levels"]


def run_held(repo: Path, out: Path, quick: bool) -> dict:
    """Issue 8's "256 concurrent streams held" figures, each from a server of its own."""
    started = time.time()
    streams = 256
    # The default config.pbtxt lets 64 char_lstm rows step at once and queues the rest;
    # for all 256 to stream, a repository whose char_lstm allows 256 and the flag to match.
    flags = ["--device", "cpu", "--stream-batch-size", str(streams)]
    with tempfile.TemporaryDirectory() as tmp:
        wide = held.wide_repository(repo, Path(tmp) / "repository", "char_lstm", streams,
                                    ["char_lstm", "lenet5"])  # fmt: skip
        server = start_server(
            "stepwise, 256 streams",
            ["serving", "--model-repository", str(wide), *flags],
            out / "held_health.log",
        )
        try:
            print(f"  {streams} streams held, Health/Check timed", flush=True)
            health = held.health_under_streams(
                server.target, server.proc.pid, streams=streams, calls=200 if quick else 500
            )
        finally:
            server.stop()
    health["server_flags"] = " ".join(flags)
    server = start_server(
        "stepwise, RSS",
        ["serving", "--model-repository", str(repo), "--device", "cpu"],
        out / "held_rss.log",
    )
    try:
        print("  RSS over many requests", flush=True)
        rss = held.rss_growth(
            server.target,
            server.proc.pid,
            warmup=500 if quick else 2000,
            requests=4000 if quick else 20000,
        )
    finally:
        server.stop()
    rss["server_flags"] = "--device cpu"
    return {"health": health, "rss": rss, "seconds": round(time.time() - started, 1)}


def run_perf(repo: Path, out: Path, quick: bool) -> dict:
    """perf_analyzer and python -m loadtest against one server, same models and levels:
    ModelInfer on the classifiers, and each language model's step graph as a sequence
    model (server-held state) beside Generate streams at the same concurrency."""
    started = time.time()
    reason = perf.unavailable()
    if reason is not None:
        print(f"  perf_analyzer unavailable, section skipped: {reason}", flush=True)
        return {"unavailable": reason}
    flags = ["--device", "cpu", "--no-request-log"]
    server = start_server(
        "stepwise, perf_analyzer",
        ["serving", "--model-repository", str(repo), *flags],
        out / "perf.log",
    )
    window_ms, timing = (1000, ["--duration", "2", "--warmup", "0.5"]) if quick else (
        3000, ["--duration", "5", "--warmup", "1"]
    )  # fmt: skip
    figures: dict = {"server_flags": " ".join(flags), "classifiers": {}, "sequences": {}}
    try:
        for model in ("lenet5", "resnet18"):
            if not (repo / model).is_dir():
                continue
            print(f"  {model}: perf_analyzer and loadtest, ModelInfer", flush=True)
            levels = ",".join(map(str, perf.CLASSIFIER_LEVELS))
            figures["classifiers"][model] = {
                "perf_analyzer": perf.measure(
                    server.target, model, perf.CLASSIFIER_LEVELS, window_ms, sequence=False
                ),
                "loadtest": load(
                    server, f"perf_loadtest_{model}", out,
                    f"--rpc model_infer --model {model} --concurrency {levels}".split(), timing,
                ),
            }  # fmt: skip
        for model in ("char_lstm", "char_gru", "char_rnn"):
            if not (repo / model).is_dir():
                continue
            print(f"  {model}: perf_analyzer sequences, loadtest Generate", flush=True)
            levels = ",".join(map(str, perf.SEQUENCE_LEVELS))
            figures["sequences"][model] = {
                "perf_analyzer": perf.measure(
                    server.target, model, perf.SEQUENCE_LEVELS, window_ms, sequence=True
                ),
                "loadtest": load(
                    server, f"perf_generate_{model}", out,
                    f"--rpc generate --model {model} --concurrency {levels} --max-tokens "
                    f"{perf.SEQUENCE_LENGTH} --temperature 0.8".split(), timing,
                ),
            }  # fmt: skip
    finally:
        server.stop()
    figures["seconds"] = round(time.time() - started, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer levels, shorter windows")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument(
        "--doc",
        type=Path,
        help="default docs/BENCHMARKS.md; with --quick, bench/results/quick/BENCHMARKS.md",
    )
    p.add_argument("--results", type=Path, default=Path("bench/results"))
    p.add_argument(
        "--only",
        choices=["held", "perf"],
        help="run only this section and merge it into the last run's bench.json (the "
        "others run together)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="BENCH_JSON",
        help="only rewrite the document from an earlier run's bench.json",
    )
    args = p.parse_args(argv)
    if args.doc is None:  # a quick run never overwrites the published figures
        args.doc = (
            args.results / "quick" / "BENCHMARKS.md" if args.quick else Path("docs/BENCHMARKS.md")
        )
    if args.render:
        from bench.document import write

        write(json.loads(args.render.read_text()), args.doc, args.render.parent)
        return 0
    quick, repo = args.quick, args.model_repository
    out = args.results / ("quick" if quick else "full")
    if args.only:
        return only(args.only, repo, out, args.doc, quick)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.time()
    report = {
        "machine": machine(),
        "quick": quick,
        "command": "make bench-quick" if quick else "make bench",
    }

    print("the limit: graphs in process", flush=True)
    seconds = 0.3 if quick else 1.5
    report["limit_steps"] = [
        row
        for m in STEP_MODELS
        if (repo / m / "1").is_dir()
        for row in inprocess.step_graph(repo / m / "1", [1, 8, 32, 64], seconds)
    ]
    report["limit_classifiers"] = [
        row
        for m in CLASSIFIERS
        if (repo / m / "1").is_dir()
        for row in inprocess.classifier(repo / m / "1", [1, 32], seconds)
    ]
    print("step-wise against recompute", flush=True)
    report["recompute"] = inprocess.step_vs_recompute(
        repo / "char_lstm" / "1", [64, 256] if quick else [64, 256, 1024]
    )

    # The load of each sweep (python -m loadtest flags); quick: fewer levels, shorter.
    unary = "--duration 1.5 --warmup 0.5" if quick else "--duration 5 --warmup 1"
    stream = "--duration 3 --warmup 1" if quick else "--duration 12 --warmup 3"
    c_unary = "1,8" if quick else "1,8,32"
    c_stream = "1,4" if quick else "1,4,16,64"
    c_caption = "1,4" if quick else "1,4,16"
    tokens = "64" if quick else "256"
    unary, stream = unary.split(), stream.split()

    def classify(model: str, data: str) -> list[str]:
        return (
            f"--rpc classify --model {model} --input-data {data} --concurrency {c_unary} "
            "--workers 2".split()
        )

    generate = (
        f"--rpc generate --model char_lstm --concurrency {c_stream} --max-tokens "
        f"{tokens} --temperature 0.8 --workers 2".split()
    )
    caption = f"--rpc caption --concurrency {c_caption} --workers 2".split()
    runs = {}
    servers = []
    try:
        flags = "--device cpu --max-streams 64 --max-workers 96 --max-streams-per-client 64"
        served = start_server(
            "stepwise",
            ["serving", "--model-repository", str(repo), *flags.split()],
            out / "stepwise.log",
        )
        servers.append(served)
        print("stepwise served", flush=True)
        runs["served classify lenet5 PNG"] = load(
            served, "served_lenet5_png", out, classify("lenet5", "digits"), unary
        )
        runs["served classify lenet5 tensor"] = load(
            served, "served_lenet5_tensor", out, classify("lenet5", "tensor"), unary
        )
        runs["served classify resnet18 PNG"] = load(
            served, "served_resnet18_png", out, classify("resnet18", "digits"), unary
        )
        runs["served classify resnet18 tensor"] = load(
            served, "served_resnet18_tensor", out, classify("resnet18", "tensor"), unary
        )
        runs["served generate char_lstm"] = load(served, "served_generate", out, generate, stream)
        if (repo / "captioner").is_dir():
            runs["served caption"] = load(served, "served_caption", out, caption, unary)
        served.stop()
        servers.remove(served)

        batched = start_server(
            "stepwise, dynamic batching",
            ["serving", "--model-repository", str(repo), *flags.split(), "--max-batch-size", "32"],
            out / "stepwise_batched.log",
        )
        servers.append(batched)
        print("stepwise served, dynamic batching on", flush=True)
        for name in ("lenet5", "resnet18"):
            runs[f"batched classify {name} PNG"] = load(
                batched, f"batched_{name}_png", out, classify(name, "digits"), unary
            )
        batched.stop()
        servers.remove(batched)

        off = start_server(
            "stepwise, continuous batching off",
            ["serving", "--model-repository", str(repo), *flags.split()]
            + ["--stream-batch-size", "1"],
            out / "stepwise_unbatched.log",
        )
        servers.append(off)
        print("stepwise served, continuous batching off", flush=True)
        runs["unbatched generate char_lstm"] = load(
            off, "unbatched_generate", out, generate, stream
        )
        if (repo / "captioner").is_dir():
            runs["unbatched caption"] = load(off, "unbatched_caption", out, caption, unary)
        off.stop()
        servers.remove(off)

        echo = start_server("echo", ["bench.echo_server"], out / "echo.log")
        servers.append(echo)
        print("the transport ceiling", flush=True)
        runs["transport classify"] = load(
            echo, "echo_classify", out, classify("echo", "digits"), unary
        )
        runs["transport generate"] = load(echo, "echo_generate", out, generate, stream)
        echo.stop()
        servers.remove(echo)

        if all(
            (args.checkpoints / f"{m}.pt").is_file() for m in ("lenet5", "resnet18", "char_lstm")
        ):
            base = start_server(
                "baseline",
                ["bench.baseline_server", "--checkpoints", str(args.checkpoints)]
                + ["--model-repository", str(repo)],
                out / "baseline.log",
            )
            servers.append(base)
            print("the PyTorch eager baseline", flush=True)
            runs["baseline classify lenet5 PNG"] = load(
                base, "baseline_lenet5_png", out, classify("lenet5", "digits"), unary
            )
            runs["baseline classify resnet18 PNG"] = load(
                base, "baseline_resnet18_png", out, classify("resnet18", "digits"), unary
            )
            runs["baseline generate char_lstm"] = load(
                base, "baseline_generate", out, generate, stream
            )
    finally:
        for server in servers:
            server.stop()
    report["runs"] = runs
    print("held: 256 streams, RSS over many requests", flush=True)
    report["held"] = run_held(repo, out, quick)
    report["held"]["command"] = report["command"]
    report["held"]["machine"] = report["machine"]
    print("perf_analyzer beside loadtest", flush=True)
    report["perf"] = run_perf(repo, out, quick)
    report["perf"]["command"] = report["command"]
    report["seconds"] = round(time.time() - started, 1)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    from bench.document import write

    write(report, args.doc, out)
    print(f"wrote {args.doc} and {out / 'bench.json'} in {report['seconds']:.0f} s")
    return 0


def only(section: str, repo: Path, out: Path, doc: Path, quick: bool) -> int:
    """`--only held|perf`: this section alone, merged into the last run's bench.json."""
    from bench.document import held_section, perf_section, write

    out.mkdir(parents=True, exist_ok=True)
    if section == "held":
        print("held: 256 streams, RSS over many requests", flush=True)
        figures = run_held(repo, out, quick)
        figures["machine"] = machine()
    else:
        print("perf_analyzer beside loadtest", flush=True)
        figures = run_perf(repo, out, quick)
    figures["command"] = f"python -m bench --only {section}" + (" --quick" if quick else "")
    print("\n".join((held_section if section == "held" else perf_section)(figures)))
    previous = out / "bench.json"
    if not previous.is_file():
        (out / f"{section}.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"no {previous} to merge into (run the whole bench once); wrote {out}/{section}.json")
        return 0
    report = json.loads(previous.read_text())
    report[section] = figures
    previous.write_text(json.dumps(report, indent=2) + "\n")
    write(report, doc, out)
    print(f"wrote {doc} and {previous}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
