"""Issue 8's last Measure line against a real server: with 256 `Generate` streams held
open, how fast does `grpc.health.v1.Health/Check` answer; and how much does the
server's RSS grow over 20,000 requests after a warm-up.

- `health_under_streams`: a spawned process (`_hold`, grpc.aio) opens the streams on
  connections of `per_connection` streams each and reads every message; once each has
  its first token, this process times Health/Check calls spaced `interval_s` apart on a
  connection of its own; then the holder says, per stream, what arrived in that window.
- `rss_growth`: client threads, a connection each, send Classify (lenet5, PNG digits)
  and short Generate streams (char_lstm) in turn; VmRSS is read from /proc after the
  warm-up, at checkpoints and at the end, each after a quiet second.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import queue
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.harness import rss_bytes
from loadtest.rpcs import BUILT_IN_PROMPTS, digit_images
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels share no connection
READY_TIMEOUT_S = 120.0


def rss_mib(pid: int) -> float:
    """The process's resident set (VmRSS) in MiB."""
    return rss_bytes(pid) / (1024 * 1024)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values_us: list[float], q: float) -> float:
    ordered = sorted(values_us)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 2)


def _generate(i: int, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="char_lstm",
        prompt=BUILT_IN_PROMPTS[i % len(BUILT_IN_PROMPTS)],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=i,
    )


# ---- 256 streams held, health checks timed ---------------------------------------------


async def _hold_async(target, streams, per_connection, max_tokens, control, results) -> None:
    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        for _ in range(-(-streams // per_connection))
    ]
    arrivals: list[list[tuple[float, int]]] = [[] for _ in range(streams)]  # (time, chars)
    ended: list[tuple[float, str] | None] = [None] * streams
    calls = []

    async def read(i: int) -> None:
        stub = pb_grpc.InferenceStub(channels[i // per_connection])
        call = stub.Generate(_generate(i, max_tokens))
        calls.append(call)
        code = "OK"
        try:
            async for response in call:
                if response.text:
                    arrivals[i].append((time.time(), len(response.text)))
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
        ended[i] = (time.time(), code)

    start = time.time()
    tasks = [asyncio.create_task(read(i)) for i in range(streams)]
    while time.time() - start < READY_TIMEOUT_S:
        if all(arrivals[i] or ended[i] for i in range(streams)):
            break
        await asyncio.sleep(0.05)
    first = [a[0][0] for a in arrivals if a]
    results.put(
        {
            "with_tokens": len(first),
            "ended_before_window": sum(e is not None for e in ended),
            "ramp_s": round(max(first) - start, 2) if first else None,
        }
    )
    loop = asyncio.get_running_loop()
    t0, t1 = await loop.run_in_executor(None, control.get)  # the window, once it has passed
    summary = _window(arrivals, ended, t0, t1)
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    results.put(summary)


def _window(arrivals, ended, t0: float, t1: float) -> dict:
    """What each stream received between t0 and t1."""
    tokens, gaps, live, codes = [], [], 0, Counter()
    for times, end in zip(arrivals, ended, strict=True):
        inside = [(t, n) for t, n in times if t0 <= t <= t1]
        tokens.append(sum(n for _, n in inside))
        live += bool(inside) and (end is None or end[0] > t1)
        if end is not None and end[0] <= t1:
            codes[end[1]] += 1
        if end is None or end[0] > t0:  # the longest wait for a message inside the window
            edges = [t0, *(t for t, _ in inside), min(t1, end[0]) if end else t1]
            gaps.append(max(b - a for a, b in zip(edges, edges[1:], strict=False)))
    seconds = t1 - t0
    return {
        "window_s": round(seconds, 2),
        "live": live,
        "tokens_per_s": round(sum(tokens) / seconds),
        "stream_tokens_per_s_min": round(min(tokens) / seconds, 1),
        "stream_tokens_per_s_p50": round(statistics.median(tokens) / seconds, 1),
        "longest_gap_ms_p50": round(statistics.median(gaps) * 1000, 1) if gaps else None,
        "longest_gap_ms_max": round(max(gaps) * 1000, 1) if gaps else None,
        "ended_in_window": dict(codes),
    }


def _hold(target, streams, per_connection, max_tokens, control, results) -> None:
    """Entry point of the stream-holding process."""
    try:
        asyncio.run(_hold_async(target, streams, per_connection, max_tokens, control, results))
    except Exception as exc:  # noqa: BLE001 - said to the parent, which raises it
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _health_checks(target: str, calls: int, interval_s: float) -> tuple[list[float], Counter]:
    """`calls` Health/Check calls spaced `interval_s` apart; latencies in us, statuses."""
    latencies, statuses = [], Counter()
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="")
        for _ in range(5):  # the connection is up before anything is timed
            check(request, timeout=10)
        due = time.perf_counter()
        for _ in range(calls):
            due += interval_s
            start = time.perf_counter_ns()
            try:
                reply = check(request, timeout=10)
                statuses[health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)] += 1
            except grpc.RpcError as err:
                statuses[err.code().name] += 1
            latencies.append((time.perf_counter_ns() - start) / 1000)
            time.sleep(max(0.0, due - time.perf_counter()))
    return latencies, statuses


def health_under_streams(
    target: str,
    pid: int,
    streams: int = 256,
    per_connection: int = 8,
    max_tokens: int = 4096,
    calls: int = 500,
    interval_s: float = 0.02,
) -> dict:
    """Health/Check latency on an idle server, then with `streams` Generate streams held."""
    idle, idle_statuses = _health_checks(target, calls // 2, interval_s)
    ctx = multiprocessing.get_context("spawn")  # grpc must not be forked
    control, results = ctx.Queue(), ctx.Queue()
    holder = ctx.Process(
        target=_hold,
        args=(target, streams, per_connection, max_tokens, control, results),
        daemon=True,
    )
    holder.start()
    try:
        ready = results.get(timeout=READY_TIMEOUT_S + 60)
        if "error" in ready:
            raise RuntimeError(f"the stream holder failed: {ready['error']}")
        rss_before = rss_mib(pid)
        cpu0, reader0, t0 = cpu_s(pid), cpu_s(holder.pid), time.time()
        held, held_statuses = _health_checks(target, calls, interval_s)
        t1, cpu1, reader1 = time.time(), cpu_s(pid), cpu_s(holder.pid)
        rss_held = rss_mib(pid)
        control.put((t0, t1))
        window = results.get(timeout=60)
        if "error" in window:
            raise RuntimeError(f"the stream holder failed: {window['error']}")
    finally:
        holder.join(timeout=30)
        if holder.is_alive():
            holder.kill()
    return {
        "streams": streams,
        "per_connection": per_connection,
        "connections": -(-streams // per_connection),
        "max_tokens": max_tokens,
        "calls": calls,
        "interval_ms": interval_s * 1000,
        "idle": {
            "p50_ms": _ms(idle, 0.5),
            "p99_ms": _ms(idle, 0.99),
            "max_ms": _ms(idle, 1.0),
            "statuses": dict(idle_statuses),
        },
        "held": {
            "p50_ms": _ms(held, 0.5),
            "p99_ms": _ms(held, 0.99),
            "max_ms": _ms(held, 1.0),
            "statuses": dict(held_statuses),
        },
        "ramp": ready,
        "window": window,
        "server_cores": round((cpu1 - cpu0) / (t1 - t0), 2),
        "reader_cores": round((reader1 - reader0) / (t1 - t0), 2),  # the streams' client
        "rss_mib_streams_opening": round(rss_before, 1),
        "rss_mib_streams_held": round(rss_held, 1),
    }


# ---- RSS over many requests -------------------------------------------------------------


class _Client:
    """One connection; request i is a Classify when i is even, a short Generate when odd."""

    def __init__(self, target: str, images: list[bytes], max_tokens: int):
        self.channel = grpc.insecure_channel(target, options=OWN_CONNECTION)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.images, self.max_tokens = images, max_tokens

    def send(self, i: int) -> tuple[str, int]:
        """(status, characters generated)."""
        try:
            if i % 2 == 0:
                image = self.images[(i // 2) % len(self.images)]
                self.stub.Classify(pb.ClassifyRequest(model="lenet5", image=image), timeout=30)
                return "OK", 0
            chars = 0
            for response in self.stub.Generate(_generate(i, self.max_tokens), timeout=30):
                chars += len(response.text)
            return "OK", chars
        except grpc.RpcError as err:
            return err.code().name, 0


def _drive(clients: list[_Client], first: int, count: int, on_done=None) -> dict:
    """Requests first .. first+count-1 from every client at once, closed loop."""
    numbers = itertools.count(first)
    lock = threading.Lock()
    codes, chars, done = Counter(), [0], [0]

    def loop(client: _Client) -> None:
        while True:
            with lock:
                i = next(numbers)
            if i >= first + count:
                return
            code, n = client.send(i)
            with lock:
                codes[code] += 1
                chars[0] += n
                done[0] += 1
                finished = done[0]
            if on_done is not None:
                on_done(finished)

    start = time.time()
    with ThreadPoolExecutor(len(clients)) as pool:
        for f in [pool.submit(loop, c) for c in clients]:
            f.result()
    seconds = time.time() - start
    return {
        "requests": count,
        "seconds": round(seconds, 1),
        "requests_per_s": round(count / seconds),
        "generated_chars": chars[0],
        "statuses": dict(codes),
    }


def rss_growth(
    target: str,
    pid: int,
    warmup: int = 2000,
    requests: int = 20000,
    clients: int = 16,
    max_tokens: int = 8,
    checkpoints: int = 5,
    settle_s: float = 1.0,
) -> dict:
    """Server VmRSS after `warmup` requests and over `requests` more, half Classify (lenet5,
    PNG) and half Generate (char_lstm, `max_tokens`), from `clients` connections at once."""
    images = digit_images(28)
    pool = [_Client(target, images, max_tokens) for _ in range(clients)]
    try:
        warm = _drive(pool, 0, warmup)
        time.sleep(settle_s)
        before = rss_mib(pid)
        samples = []  # (requests done, MiB), read on the fly at each checkpoint
        every = max(1, requests // checkpoints)
        results: queue.Queue = queue.Queue()

        def on_done(n: int) -> None:
            if n % every == 0:
                results.put((n, round(rss_mib(pid), 1)))

        cpu0 = cpu_s(pid)
        load = _drive(pool, warmup, requests, on_done)
        load["server_cpu_s"] = round(cpu_s(pid) - cpu0, 1)
        time.sleep(settle_s)
        after = rss_mib(pid)
        while not results.empty():
            samples.append(results.get())
    finally:
        for client in pool:
            client.channel.close()
    return {
        "clients": clients,
        "max_tokens": max_tokens,
        "warmup": warm,
        "load": load,
        "rss_mib_after_warmup": round(before, 1),
        "rss_mib_checkpoints": sorted(samples),
        "rss_mib_after": round(after, 1),
        "growth_percent": round(100 * (after - before) / before, 2),
    }


def wide_repository(repo: Path, dest: Path, model: str, batch: int, keep: list[str]) -> Path:
    """A repository at `dest` holding `keep` from `repo` (linked, not copied), with
    `model`'s config.pbtxt allowing `batch` rows (max_batch_size, and the sequence
    batcher's candidates); the operator's knob, as in Triton."""
    from google.protobuf import text_format

    from serving._proto.inference import model_config_pb2 as mc

    dest.mkdir(parents=True)
    for name in keep:
        if name != model:
            (dest / name).symlink_to((repo / name).resolve(), target_is_directory=True)
            continue
        (dest / name).mkdir()
        for version in (repo / name).iterdir():
            if version.is_dir():
                (dest / name / version.name).symlink_to(version.resolve(), True)
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        config.max_batch_size = batch
        config.sequence_batching.oldest.max_candidate_sequences = batch
        (dest / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return dest
