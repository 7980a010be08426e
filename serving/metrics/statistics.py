"""Every counter of a model, as plain data, in one place: Triton's inference statistics
(ModelStatistics, and the Prometheus exporter's nv_inference_*) for every protocol
(Classify, Generate, Caption, KServe ModelInfer and sequence steps count alike), the
graph runs by batch size (the dynamic batcher's and the engine's), and what a step
model's engine did (`EngineStats`). ModelStatistics, Prometheus, tests and the bench
all read them here.

A request is timed in phases, Triton's: `queue` (waiting for a worker, a batch or a
batch row), `input` (decoding and checking its tensors), `infer` (the graph run, or
for a stream its time in the continuous batch) and `output` (building the response).
It ends as a success or a failure, with its whole duration. An execution is one graph
run, however many requests its batch served. No gRPC here: the KServe servicer turns
a `ModelStats.snapshot()` into the protocol's message.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

PHASES = ("queue", "input", "infer", "output")


class RequestTiming:
    """One request's clock: `mark(phase)` adds the time since the previous mark (or the
    start) to `phase`. Marks may come from other threads (a batcher's) as long as they
    happen one after another, as a request's steps do."""

    def __init__(self, count: int = 1):
        self.start = self._last = time.perf_counter_ns()
        self.ns = dict.fromkeys(PHASES, 0)
        self.count = count  # batch elements, known once the input is decoded

    def mark(self, phase: str) -> None:
        now = time.perf_counter_ns()
        self.ns[phase] += now - self._last
        self._last = now

    def engine(self, queue_ns: int) -> None:
        """A request the continuous batch ran: since the last mark it waited `queue_ns`
        for a row, and spent the rest in the batch (`infer`)."""
        now = time.perf_counter_ns()
        elapsed = now - self._last
        queue_ns = min(max(queue_ns, 0), elapsed)
        self.ns["queue"] += queue_ns
        self.ns["infer"] += elapsed - queue_ns
        self._last = now


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class Snapshot:
    """A copy of one model's counters (what ModelStatistics reports)."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    phases: dict[str, Duration] = field(
        default_factory=lambda: {p: Duration() for p in PHASES}
    )  # the successful requests' phases
    inference_count: int = 0  # batch elements of successful requests
    execution_count: int = 0  # graph runs timed here (a batch counts once)
    # batch size -> (executions, their graph time in ns)
    batches: dict[int, Duration] = field(default_factory=dict)
    last_inference_ms: int = 0  # wall clock of the last request's end, ms since the epoch


@dataclass
class EngineStats:
    """What the engine did, counted in one place for tests, metrics and benchmarks."""

    iterations: int = 0
    step_runs: int = 0
    prefill_runs: int = 0
    joins: int = 0
    leaves: int = 0
    refused: int = 0
    preemptions: int = 0  # prefilling streams swapped out for a shorter prompt
    batch_sizes: Counter = field(default_factory=Counter)  # decode rows per step run -> runs
    # Batched state moved between host and device (bound decode runs only): an upload
    # when the decode batch's streams change, a download before that and for answers.
    state_uploads: int = 0
    state_downloads: int = 0
    finish_reasons: Counter = field(default_factory=Counter)


class ModelStats:
    """One model's counters, safe from any thread (`engine`: written by the model's
    engine thread alone, read as plain numbers)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._data = Snapshot()
        self.engine = EngineStats()  # a step model's continuous batching

    @property
    def batch_sizes(self) -> Counter:
        """Batch size -> graph runs timed as executions (the dynamic batcher's batches)."""
        return Counter({size: d.count for size, d in self.snapshot().batches.items()})

    @contextlib.contextmanager
    def request(self, count: int = 1):
        """Time one request of `count` batch elements: yields its `RequestTiming`; it
        succeeds when the block ends normally and fails on any exception (cancellation,
        a client gone, included)."""
        timing = RequestTiming(count)
        try:
            yield timing
        except BaseException:
            self.finish(timing, ok=False)
            raise
        self.finish(timing, ok=True)

    def finish(self, timing: RequestTiming, ok: bool) -> None:
        total = time.perf_counter_ns() - timing.start
        with self._lock:
            data = self._data
            data.last_inference_ms = int(time.time() * 1000)
            if not ok:
                data.fail.add(total)
                return
            data.success.add(total)
            data.inference_count += timing.count
            for phase, ns in timing.ns.items():
                data.phases[phase].add(ns)

    def execution(self, batch_size: int, infer_ns: int) -> None:
        """One graph run of `batch_size` rows that took `infer_ns`."""
        with self._lock:
            self._data.execution_count += 1
            self._data.batches.setdefault(batch_size, Duration()).add(infer_ns)

    def snapshot(self) -> Snapshot:
        with self._lock:
            d = self._data
            return Snapshot(
                Duration(d.success.count, d.success.ns),
                Duration(d.fail.count, d.fail.ns),
                {p: Duration(v.count, v.ns) for p, v in d.phases.items()},
                d.inference_count,
                d.execution_count,
                {b: Duration(v.count, v.ns) for b, v in sorted(d.batches.items())},
                d.last_inference_ms,
            )


class Statistics:
    """Every model's `ModelStats` by name, made on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, ModelStats] = {}

    def reset(self, name: str) -> None:
        """Start `name` from zero (a new version); holders of the old counters keep them."""
        with self._lock:
            self._models.pop(name, None)

    def __getitem__(self, name: str) -> ModelStats:
        with self._lock:
            stats = self._models.get(name)
            if stats is None:
                stats = self._models[name] = ModelStats()
            return stats
