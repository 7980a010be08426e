"""One load-generating process: closed loop (N requests outstanding) or open loop
(requests sent at a rate, constant or Poisson), cut into windows on a shared clock.

Windows are aligned across workers by wall-clock time: window k of a level covers
[start + warmup + k * window_s, ... + window_s). A request counts in the window in
which it completes (as perf_analyzer counts), so every window is closed as soon as
its end has passed. Each finished window is put on the result queue as plain data.
"""

from __future__ import annotations

import itertools
import random
import resource
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc

from loadtest.rpcs import RPCS
from loadtest.stats import Window

DELAY_TOLERANCE_US = 10_000  # an open-loop send this late counts as delayed
MAX_OUTSTANDING = 1024  # open loop: past this many in flight, a send is dropped
OPEN_LOOP_CONNECTIONS = 32
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels share no connection


@dataclass(frozen=True)
class Plan:
    """What one worker does for one level."""

    target: str
    rpc: str
    requests: list[bytes]  # the serialized request messages, sent round-robin
    start: float  # time.time() of the level's start, shared by all workers (set at go)
    warmup_s: float
    window_s: float
    max_windows: int
    timeout_s: float
    concurrency: int = 0  # closed loop: requests outstanding in this worker
    rate: float = 0.0  # open loop: requests per second from this worker
    arrivals: str = "constant"  # or "poisson"
    phase_s: float = 0.0  # open loop: this worker's offset into the shared schedule
    seed: int = 0


class Flag:
    """A flag shared with worker processes, without a lock: `set()` never blocks. (A
    multiprocessing.Event's set() waits for every process asleep in its wait() to wake,
    forever for one that died there, and its lock stays taken by a process that exits
    inside is_set().) `wait()` polls."""

    POLL_S = 0.005

    def __init__(self, ctx):
        self._value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._value.value:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(self.POLL_S if left is None else min(self.POLL_S, left))
        return True


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Collector:
    """Completed requests sorted into windows by completion time."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.measure_start = plan.start + plan.warmup_s
        self.windows: dict[int, Window] = {}
        self.lock = threading.Lock()

    def index(self, t: float) -> int:
        return int((t - self.measure_start) // self.plan.window_s)

    def window(self, k: int) -> Window:
        if k not in self.windows:
            self.windows[k] = Window(seconds=self.plan.window_s)
        return self.windows[k]

    def _at_now(self, update) -> None:
        """Apply `update` to the window of this moment. The index is read under the lock,
        so nothing lands in a window that `take` has already closed."""
        with self.lock:
            k = self.index(time.time())
            if 0 <= k < self.plan.max_windows:
                update(self.window(k))

    def record(self, outcome) -> None:
        self._at_now(lambda w: w.record(outcome))

    def sent(self, delay_us: float) -> None:
        def update(w: Window) -> None:
            w.sent += 1
            w.delayed += delay_us > DELAY_TOLERANCE_US

        self._at_now(update)

    def tokens(self, n: int) -> None:
        self._at_now(lambda w: w.add_tokens(n))

    def scheduled(self, intended: float) -> None:
        """Open loop: a send was due at `intended` (sent or not)."""
        with self.lock:
            k = self.index(intended)
            if 0 <= k < self.plan.max_windows:
                self.window(k).scheduled += 1

    def take(self, k: int) -> Window:
        with self.lock:
            return self.windows.pop(k, None) or Window(seconds=self.plan.window_s)


def run(plan: Plan, worker: int, results, stop, go, start) -> None:
    """Set up, say ("ready", worker), wait for `go` and the level's `start` time, then
    generate load until `stop` is set or the last window ends. Puts each window on
    `results` as ("window", worker, k, data), then ("done", worker, None, None)."""
    # A connection per closed-loop thread (and a pool of them for the open loop), as
    # separate clients would have: servers cap the streams one connection may hold.
    channels = [
        grpc.insecure_channel(plan.target, options=OWN_CONNECTION)
        for _ in range(plan.concurrency or OPEN_LOOP_CONNECTIONS)
    ]
    rpcs = [RPCS[plan.rpc](channel) for channel in channels]
    results.put(("ready", worker, None, None))
    if not go.wait(120) or stop.is_set():
        results.put(("done", worker, None, None))
        return
    plan = replace(plan, start=start.value)
    collector = _Collector(plan)
    messages = [rpcs[0].request_type.FromString(data) for data in plan.requests]
    next_request = itertools.cycle(messages).__next__
    next_rpc = itertools.cycle(rpcs).__next__
    end = collector.measure_start + plan.window_s * plan.max_windows
    lock = threading.Lock()

    def one(rpc=None, intended: float | None = None) -> None:
        with lock:
            request = next_request()
            rpc = rpc or next_rpc()
        if intended is not None:
            collector.sent((time.time() - intended) * 1e6)
        else:
            collector.sent(0)
        collector.record(rpc.call(request, plan.timeout_s, collector.tokens))

    def closed_loop(rpc) -> None:
        while not stop.is_set() and time.time() < end:
            one(rpc)

    threads: list[threading.Thread] = []
    pool = None
    if plan.concurrency:
        threads = [threading.Thread(target=closed_loop, args=(r,), daemon=True) for r in rpcs]
    else:
        pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="send")
        threads = [
            threading.Thread(
                target=_open_loop, args=(plan, pool, one, stop, end, collector), daemon=True
            )
        ]
    for t in threads:
        t.start()

    cpu = _cpu_seconds()
    for k in range(plan.max_windows):
        boundary = collector.measure_start + (k + 1) * plan.window_s
        if k == 0:  # the warm-up's CPU is not the first window's
            stop.wait(max(0.0, collector.measure_start - time.time()))
            cpu = _cpu_seconds()
        if stop.wait(max(0.0, boundary - time.time())):
            break
        window = collector.take(k)
        now_cpu = _cpu_seconds()
        window.loadgen_cpu_s, cpu = now_cpu - cpu, now_cpu
        window.loadgen_cpu_max_s = window.loadgen_cpu_s
        results.put(("window", worker, k, window.encode()))
    results.put(("done", worker, None, None))
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    for channel in channels:
        channel.close()


def _open_loop(plan: Plan, pool: ThreadPoolExecutor, one, stop, end: float, collector) -> None:
    rng = random.Random(plan.seed)
    outstanding = threading.Semaphore(MAX_OUTSTANDING)
    t = plan.start + plan.phase_s  # workers' constant schedules interleave, not coincide
    while not stop.is_set():
        t += rng.expovariate(plan.rate) if plan.arrivals == "poisson" else 1.0 / plan.rate
        if t >= end:
            return
        collector.scheduled(t)
        delay = t - time.time()
        if delay > 0 and stop.wait(delay):
            return
        if not outstanding.acquire(blocking=False):
            continue  # the server cannot keep up; counted as not sent

        def task(intended=t):
            try:
                one(intended=intended)
            finally:
                outstanding.release()

        pool.submit(task)


def process_main(plan: Plan, worker: int, results, stop, go, start) -> None:
    """Entry point of a worker process."""
    try:
        run(plan, worker, results, stop, go, start)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which says it in one line
        results.put(("error", worker, None, f"{type(exc).__name__}: {exc}"))
