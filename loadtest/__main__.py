"""python -m loadtest: measure a stepwise server as Triton's perf_analyzer and
genai-perf measure theirs.

  python -m loadtest --rpc classify --concurrency 1,4,16
  python -m loadtest --rpc generate --model char_lstm --concurrency 1,4 --max-tokens 256
  python -m loadtest --rpc classify --request-rate 200,400 --arrivals poisson

Each level of the sweep (a concurrency, or a request rate) runs a warm-up, then
measurement windows: one of --duration seconds, or windows of --measurement-interval
milliseconds until throughput and p95 latency are stable (within
--stability-percentage over three consecutive windows) or --max-windows have run.
Every run is bounded in time. Results: a table, results.json, results.csv and plots
in --output-dir.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue
import sys
import time
from pathlib import Path

import grpc

from loadtest import report
from loadtest.rpcs import DEFAULT_MODELS, RPCS
from loadtest.stats import Window, stable
from loadtest.worker import Flag, Plan, process_main


def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, not {text!r}"
            ) from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"every value must be above 0: {text!r}")
        return values

    return parse


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to load")
    g.add_argument("--target", default="localhost:8001", help="server HOST:PORT")
    g.add_argument("--rpc", choices=sorted(RPCS), default="classify")
    g.add_argument("--model", help="model name (default: lenet5, char_lstm or captioner)")
    g = p.add_argument_group("load (one of)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=_list(int),
        metavar="N[,N...]",
        help="closed loop: requests outstanding at each level (default 1)",
    )
    mode.add_argument(
        "--request-rate",
        type=_list(float),
        metavar="R[,R...]",
        help="open loop: requests per second at each level",
    )
    g.add_argument(
        "--arrivals",
        choices=["constant", "poisson"],
        default="constant",
        help="open loop: the time between requests",
    )
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--warmup",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds of load before measuring, at each level",
    )
    g.add_argument(
        "--duration",
        type=_positive(float),
        metavar="S",
        help="one window of S seconds per level (instead of stability)",
    )
    g.add_argument(
        "--measurement-interval",
        type=_positive(int),
        default=2000,
        metavar="MS",
        help="window length in ms (default 2000)",
    )
    g.add_argument(
        "--stability-percentage",
        type=_positive(float),
        default=10.0,
        metavar="PCT",
        help="throughput and p95 within this %% over 3 windows (default 10)",
    )
    g.add_argument(
        "--max-windows",
        type=_positive(int),
        default=10,
        metavar="N",
        help="windows per level at most, stable or not (default 10)",
    )
    g.add_argument("--request-timeout", type=_positive(float), default=60.0, metavar="S")
    g.add_argument(
        "--connect-timeout",
        type=_positive(float),
        default=5.0,
        metavar="S",
        help="give up when the server cannot be reached in this time (default 5)",
    )
    g.add_argument(
        "--wait-healthy",
        type=_positive(float),
        metavar="S",
        help="first wait up to S seconds for the gRPC health service to say SERVING "
        "(a deployment still starting; through a load balancer, some replica's answer)",
    )
    g.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        metavar="N",
        help="load-generating processes; the load is split between them",
    )
    g.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="a server process on this machine: its CPU time per request",
    )
    g = p.add_argument_group("inputs")
    g.add_argument(
        "--input-data",
        default="digits",
        metavar="digits|tensor|DIR",
        help="classify: rendered digits as PNG, random tensors, or a folder",
    )
    g.add_argument(
        "--image-size", type=_positive(int), default=28, help="classify: the digits' size in pixels"
    )
    g.add_argument("--prompts-file", help="generate: one prompt per line (\\n for newlines)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="the same seed for every request")
    g.add_argument("--max-length", type=int, help="caption: words at most")
    g.add_argument(
        "--stream-interval-ms",
        type=int,
        help="generate, caption: coalesce tokens within this many ms into one message "
        "(the request's stream_interval_ms; unset: the server's default)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("loadtest-results"))
    g.add_argument("--quiet", action="store_true", help="no per-window progress")
    args = p.parse_args(argv)
    args.model = args.model or DEFAULT_MODELS[args.rpc]
    if not args.concurrency and not args.request_rate:
        args.concurrency = [1]
    return args


def _levels(args) -> list[dict]:
    if args.concurrency:
        return [{"concurrency": c} for c in args.concurrency]
    return [{"request_rate": r} for r in args.request_rate]


def _split(total, workers: int, whole: bool) -> list:
    """A level's load divided between workers (whole requests for concurrency)."""
    if whole:
        return [total // workers + (i < total % workers) for i in range(workers)]
    return [total / workers] * workers


def server_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process and of its live child processes (a server's engine
    process), from /proc/PID/stat."""
    if pid is None:
        return None
    own = _cpu_and_parent(pid)
    if own is None:
        return None
    children = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            found = _cpu_and_parent(int(entry.name))
            if found is not None and found[1] == pid:
                children += server_cpu_seconds(int(entry.name)) or 0.0
    return own[0] + children


def _cpu_and_parent(pid: int) -> tuple[float, int] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[1])


class Inbox:
    """The parent's side of the result queue: windows arrive per worker, in order for
    each worker but interleaved between them; a worker's "done" means it sends nothing
    more (it never stands for a window)."""

    def __init__(self, get, workers: list[int]):
        self.get, self.workers = get, set(workers)
        self.windows: dict[int, dict[int, dict]] = {}  # k -> worker -> encoded window
        self.ready: set[int] = set()
        self.done: set[int] = set()

    def _receive(self, timeout: float) -> None:
        kind, worker, k, data = self.get(timeout=timeout)
        if kind == "error":
            raise RuntimeError(data)
        if kind == "ready":
            self.ready.add(worker)
        elif kind == "done":
            self.done.add(worker)
        else:
            self.windows.setdefault(k, {})[worker] = data

    def wait_ready(self, deadline: float) -> None:
        while self.ready | self.done < self.workers:
            self._receive(max(0.1, deadline - time.time()))

    def window(self, k: int, deadline: float) -> Window:
        """Window k merged over every worker that has not finished before sending it."""
        while True:
            got = self.windows.get(k, {})
            if all(w in got or w in self.done for w in self.workers):
                break
            self._receive(max(0.1, deadline - time.time()))
        merged = Window()
        for data in self.windows.pop(k, {}).values():
            merged.merge(Window.decode(data))
        return merged


def wait_healthy(target: str, seconds: float) -> str | None:
    """Poll grpc.health.v1 Check until SERVING; None then, else why not in time."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline, last = time.monotonic() + seconds, "no answer"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return None
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = err.code().name if err.code() else "UNKNOWN"
            if time.monotonic() >= deadline:
                return f"{target} not SERVING within {seconds:g} s (last: {last})"
            time.sleep(1.0)


def run_level(args, level: dict, requests: list, say) -> dict:
    """Run one level with its workers; return its figures."""
    ctx = multiprocessing.get_context("spawn")  # grpc must not be forked
    # Lock-free flags (worker.Flag), not ctx.Event(): Event.set() in the finally below
    # blocks forever once a worker has died inside stop.wait().
    results, stop, go, start = ctx.Queue(), Flag(ctx), Flag(ctx), ctx.RawValue("d", 0.0)
    window_s = args.duration or args.measurement_interval / 1000
    max_windows = 1 if args.duration else args.max_windows
    closed = "concurrency" in level
    total = level["concurrency"] if closed else level["request_rate"]
    procs = []
    for i, share in enumerate(_split(total, args.workers, closed)):
        if not share:
            continue
        plan = Plan(
            args.target, args.rpc, requests, 0.0, args.warmup, window_s, max_windows,
            args.request_timeout, concurrency=share if closed else 0,
            rate=0.0 if closed else share, arrivals=args.arrivals,
            phase_s=0.0 if closed else i / total, seed=(args.seed or 0) + i,
        )  # fmt: skip
        proc = ctx.Process(target=process_main, args=(plan, i, results, stop, go, start),
                           daemon=True)  # fmt: skip
        proc.start()
        procs.append((i, proc))
    inbox = Inbox(results.get, [i for i, _ in procs])
    windows, error = [], None
    try:
        inbox.wait_ready(time.time() + 120)  # every worker connected: a common start
        start.value = time.time() + 0.1
        go.set()
        measure_start = start.value + args.warmup
        time.sleep(max(0.0, measure_start - time.time()))
        cpu_before = server_cpu_seconds(args.server_pid)
        for k in range(max_windows):
            merged = inbox.window(k, measure_start + (k + 1) * window_s + 10)
            merged.seconds = window_s
            cpu_now = server_cpu_seconds(args.server_pid)
            merged.server_cpu_s = (
                None if cpu_before is None or cpu_now is None else (cpu_now - cpu_before)
            )
            cpu_before = cpu_now
            windows.append(merged)
            say(_progress(level, k, max_windows, merged))
            if not args.duration and stable(windows, args.stability_percentage / 100):
                break
    except queue.Empty:
        error = "a load-generating worker stopped answering"
    except RuntimeError as exc:  # a worker's own error, in one line
        error = str(exc)
    finally:
        stop.set()
        go.set()
        for _, proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    figures = summarize(level, windows, args)
    if error:
        figures["error"] = error
    return figures


def _progress(level: dict, k: int, max_windows: int, w: Window) -> str:
    name = report._level_name(level)
    lat = w.distribution("latency")
    text = f"{name:>10}  window {k + 1}/{max_windows}  {w.throughput():8.1f} req/s"
    if lat:
        text += f"  p50 {lat['p50'] / 1000:.2f} ms  p95 {lat['p95'] / 1000:.2f} ms"
    if w.tokens:
        text += f"  {w.tokens / w.seconds:.0f} tok/s"
    errors = {k: v for k, v in w.codes.items() if k != "OK"}
    if errors:
        text += "  errors " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    return text + f"  loadgen {w.loadgen_cpu_s / w.seconds:.2f} cores"


def summarize(level: dict, windows: list[Window], args) -> dict:
    """A level's figures from its last three windows (all when fewer)."""
    used = windows[-3:]
    total = Window()
    server_cpu = [w.server_cpu_s for w in used if getattr(w, "server_cpu_s", None) is not None]
    for w in used:
        total.merge(w)
    total.seconds = sum(w.seconds for w in used)
    seconds = total.seconds or 1.0
    figures = dict(level)
    figures.update(
        windows=len(windows),
        stable=bool(args.duration) or stable(windows, args.stability_percentage / 100),
        seconds=round(total.seconds, 3),
        requests=total.requests,
        successes=total.successes,
        errors={k: v for k, v in sorted(total.codes.items()) if k != "OK"},
        throughput_rps=round(total.successes / seconds, 2),
        tokens_per_s=round(total.tokens / seconds, 1),
        tokens_per_message=round(total.tokens / total.messages, 3) if total.messages else None,
        latency_us=total.distribution("latency"),
        ttft_us=total.distribution("ttft"),
        itl_us=total.distribution("itl"),
        tpot_us=total.distribution("tpot"),
        message_gap_us=total.distribution("gap"),
        loadgen_cpu_cores=round(total.loadgen_cpu_s / seconds, 3),
    )
    # A worker is one Python process: near one core it is the bottleneck, whatever
    # the machine has; so is the whole generator near all the cores.
    busiest = max((w.loadgen_cpu_max_s / w.seconds for w in used if w.seconds), default=0.0)
    figures["loadgen_busiest_worker_cores"] = round(busiest, 3)
    figures["loadgen_saturated"] = busiest > 0.9 or figures["loadgen_cpu_cores"] > 0.9 * (
        os.cpu_count() or 1
    )
    if "request_rate" in level:
        figures["sent_rps"] = round(total.sent / seconds, 2)
        figures["scheduled_rps"] = round(total.scheduled / seconds, 2)
        figures["delayed_fraction"] = round(total.delayed / total.sent, 4) if total.sent else 1.0
        figures["sustained"] = (
            total.sent >= 0.95 * total.scheduled and figures["delayed_fraction"] < 0.1
        )
    if len(server_cpu) == len(used) and used:
        cpu = sum(server_cpu)
        figures["server_cpu_cores"] = round(cpu / seconds, 3)
        figures["server_cpu_s_per_request"] = (
            round(cpu / total.requests, 6) if total.requests else None
        )
        figures["server_cpu_s_per_1k_tokens"] = (
            round(1000 * cpu / total.tokens, 4) if total.tokens else None
        )
    figures["window_figures"] = [_window_figures(w) for w in windows]
    return figures


def _window_figures(w: Window) -> dict:
    """What one window saw, for judging stability and the server's cost over time."""
    cpu = getattr(w, "server_cpu_s", None)
    return {
        "throughput_rps": round(w.throughput(), 2),
        "latency_p95_us": w.percentile_us("latency", 95) if w.successes else None,
        "tokens_per_s": round(w.tokens / w.seconds, 1) if w.seconds else 0.0,
        "errors": {k: v for k, v in sorted(w.codes.items()) if k != "OK"},
        "loadgen_cpu_cores": round(w.loadgen_cpu_s / w.seconds, 3) if w.seconds else 0.0,
        "server_cpu_s_per_request": round(cpu / w.requests, 6) if cpu and w.requests else None,
        "server_cpu_s_per_1k_tokens": round(1000 * cpu / w.tokens, 4) if cpu and w.tokens else None,
    }


def _prepare(args, results: dict) -> list[bytes]:
    """Connect and build the requests; on failure, say why in results["error"]."""
    channel = grpc.insecure_channel(args.target)
    try:
        grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        return [r.SerializeToString() for r in RPCS[args.rpc].requests(args, channel)]
    except grpc.FutureTimeoutError:
        results["error"] = f"cannot reach {args.target} within {args.connect_timeout:g} s"
    except (OSError, ValueError, grpc.RpcError) as exc:
        results["error"] = f"cannot prepare {args.rpc} inputs: {exc}"
    finally:
        channel.close()
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "command": "python -m loadtest " + " ".join(sys.argv[1:] if argv is None else argv),
        "target": args.target,
        "rpc": args.rpc,
        "model": args.model,
        "workers": args.workers,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
        },
        "levels": [],
    }
    status = 0
    if args.wait_healthy:
        say(f"waiting up to {args.wait_healthy:g} s for {args.target} to be SERVING")
        unhealthy = wait_healthy(args.target, args.wait_healthy)
        if unhealthy:
            results["error"] = unhealthy
    if "error" not in results:
        requests = _prepare(args, results)
    if "error" not in results:
        for level in _levels(args):
            figures = run_level(args, level, requests, say)
            results["levels"].append(figures)
            if figures.get("loadgen_saturated"):
                say(
                    f"warning: the load generator used {figures['loadgen_cpu_cores']:.2f} cores, "
                    f"its busiest worker {figures['loadgen_busiest_worker_cores']:.2f}: it may be "
                    "the bottleneck; add --workers, or run it on another machine"
                )
            if figures.get("sustained") is False:
                say(
                    f"warning: {figures['request_rate']:g} requests/s could not be sustained "
                    f"(sent {figures['sent_rps']:g}/s of {figures['scheduled_rps']:g}/s due, "
                    f"{figures['delayed_fraction']:.0%} late)"
                )
            if "error" in figures:
                results["error"] = figures["error"]
                break
    if "error" in results:
        print(f"error: {results['error']}", file=sys.stderr)
        status = 1
    report.write_json(args.output_dir / "results.json", results)
    report.write_csv(args.output_dir / "results.csv", results["levels"])
    plots = report.write_plots(args.output_dir, results)
    if results["levels"]:
        print(report.table(results["levels"]))
    written = ["results.json", "results.csv", *(p.name for p in plots)]
    say(f"wrote {', '.join(written)} to {args.output_dir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
