"""Continuous (iteration-level) batching of one step model's streams.

At every iteration (`Scheduler.step`):
1. decide: waiting streams join while the batch has room (FIFO); with the batch full,
   a waiting short prompt swaps out the stream with the most prompt still to prefill;
   cancelled and timed-out streams leave; each stream still consuming its prompt gets
   its next chunk (`model.prefill_chunk` tokens, the least prompt left first) while the
   iteration's prefill budget lasts, so a long prompt never stalls the running streams
   for more than one chunk per iteration, and never delays a short one;
2. run: one step-graph call for every stream that feeds one sampled token, one
   prefill-graph call per group of equal chunk lengths, the state rows gathered from
   the streams and scattered back (along the card's batch axis);
3. deliver: the streams whose input is consumed sample their next token together
   (`serving.engine.sampler.sample_rows`, each with its own parameters and generator), and
   each token goes through the stream's output processor into its outbox.

A graph run that raises is retried one row at a time, so a request that breaks the
graph fails alone; a row whose logits are not finite fails alone. No gRPC here: the
transport submits `Sequence`s and takes from their outboxes; `StepEngine` runs the
loop on a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from serving.core.leases import Leases
from serving.engine.request import Delta, Sequence, Status
from serving.engine.sampler import sample_rows
from serving.errors import (
    DeadlineExceeded,
    NonFiniteOutput,
    ResourceExhausted,
    ServingError,
    Unavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64  # streams stepped together per iteration
    max_queue_size: int = 256  # streams waiting to join; past it RESOURCE_EXHAUSTED at once
    prefill_tokens_per_iteration: int = 128  # prompt tokens consumed per iteration, at most
    # Run every graph call at exactly max_batch_size rows (zero rows fill the rest), so a
    # row's arithmetic never depends on how many others run with it. The CPU provider is
    # row-invariant as it is; on CUDA the GEMM kernels change with the batch size and a
    # seeded stream's text could change with its company (measured: tools/cuda_check.py).
    # None: pad when the model runs on CUDA.
    pad_batches: bool | None = None
    # Keep the decode batch's state on the model's device between iterations (ONNX
    # Runtime I/O binding): while the same streams step again, their state never leaves
    # the device; it comes to the host only when a stream joins or leaves the batch.
    # None: on when the model runs on CUDA (on the CPU the host is the device, and the
    # binding costs a little per run: docs/BENCHMARKS.md).
    bind_state: bool | None = None

    def __post_init__(self):
        if min(self.max_batch_size, self.max_queue_size, self.prefill_tokens_per_iteration) < 1:
            raise ValueError(
                "max_batch_size, max_queue_size and prefill_tokens_per_iteration must be >= 1"
            )


@dataclass
class EngineStats:
    """What the scheduler did, counted in one place for tests, metrics and benchmarks."""

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


class EngineObserver:
    """What a scheduler reports as it goes, for metrics (`serving.metrics.prometheus`); these
    defaults ignore it. Called on the engine's thread: keep it cheap."""

    def run(self, graph: str, rows: int, seconds: float) -> None:
        """A graph run ("step": a decode iteration; "prefill": a prompt chunk) of `rows`
        streams that took `seconds`."""

    def first_token(self, seconds: float) -> None:
        """A stream's first sampled token, `seconds` after it was submitted."""

    def token(self, gap_seconds: float) -> None:
        """A stream's next token, `gap_seconds` after its previous one."""


class Scheduler:
    """Bookkeeping and one iteration at a time; `step()` is called by `StepEngine`'s
    thread, or directly by tests and `run_alone`."""

    def __init__(
        self,
        model,
        config: EngineConfig = EngineConfig(),
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        observer: EngineObserver | None = None,
    ):
        self.model, self.config, self.wake, self.clock = model, config, wake, clock
        self.observer = observer or EngineObserver()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._zero = model.zero_state(1)
        self._axis = model.state_axis
        self._prefill = "prefill" in model.graphs
        pad = config.pad_batches
        self.pad_to = config.max_batch_size if (pad is None and _on_cuda(model)) or pad else 0
        bind = config.bind_state
        self.bind = _on_cuda(model) if bind is None else bind
        # The decode batch whose state lives on the device: its streams in row order and
        # the state OrtValues; their `seq.state` is stale while it lives (see `_settle`).
        self._resident: tuple[list[Sequence], dict] | None = None

    @property
    def live(self) -> int:
        return len(self._waiting) + len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def occupancy(self) -> tuple[int, int]:
        """(streams in the batch, streams waiting for a row), from any thread. A stream
        that finished this iteration is out already: its client may have its end before
        the iteration drops it from the batch."""
        with self._lock:
            running = sum(1 for s in self._running if s.status is not Status.FINISHED)
            return running, len(self._waiting)

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if len(self._waiting) >= self.config.max_queue_size:
                self.stats.refused += 1
                raise ResourceExhausted(
                    f"{self.model.name}: {len(self._running)} streams running and "
                    f"{len(self._waiting)} queued, the most allowed; retry later"
                )
            self._waiting.append(seq)
        self.wake()

    def cancel(self, seq: Sequence) -> None:
        """Safe from any thread: the stream leaves at the start of the next iteration."""
        seq.cancelled = True
        self.wake()

    # -- one iteration ------------------------------------------------------------------

    def step(self) -> int:
        """Run one iteration; the number of streams that ran in it."""
        now = self.clock()
        self._running = [s for s in self._running if not self._gone(s, now)]
        self._admit(now)
        if not self._running:
            return 0
        self.stats.iterations += 1
        ready: list[tuple[Sequence, np.ndarray]] = []
        decode = [s for s in self._running if self._by_step(s)]
        prefill = self._prefill_groups()  # decided before the decode run moves anything
        if decode:
            tokens = np.stack([s.pending[:1] for s in decode])  # [B, 1]
            ready += self._run("step", decode, tokens)
            self.stats.step_runs += 1
            self.stats.batch_sizes[len(decode)] += 1
        for length, group in prefill.items():
            tokens = np.stack([s.pending[:length] for s in group])  # [G, length]
            ready += self._run("prefill", group, tokens)
            self.stats.prefill_runs += 1
        if ready:
            self._sample(ready)
        self._running = [s for s in self._running if s.status is not Status.FINISHED]
        return len(decode) + sum(1 for s in self._running if s.status is Status.PREFILL)

    def _gone(self, seq: Sequence, now: float) -> bool:
        """Cancelled or past its deadline: the stream leaves (and says why)."""
        if seq.cancelled:
            self._leave(seq, "cancelled")
        elif seq.deadline is not None and now > seq.deadline:
            self._leave(seq, "deadline", DeadlineExceeded("the deadline passed"))
        return seq.status is Status.FINISHED

    def _admit(self, now: float) -> None:
        with self._lock:
            if any(s.cancelled or s.deadline is not None for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not self._gone(s, now))
            while self._waiting and len(self._running) < self.config.max_batch_size:
                self._join(self._waiting.popleft(), now)
            if self._waiting and self._prefill:
                self._swap_in_shortest(now)

    def _join(self, seq: Sequence, now: float) -> None:
        seq.status, seq.joined = Status.PREFILL, seq.joined or now  # first join: queue time
        self._running.append(seq)
        self.stats.joins += 1

    def _swap_in_shortest(self, now: float) -> None:
        """Under the lock, the batch full and streams waiting: the waiting stream with the
        least prompt left takes the row of the running stream with the most still to
        prefill, when that is PREEMPT_MARGIN_CHUNKS chunks more; the stream swapped out
        keeps its state and waits at the head of the queue, to resume where it stopped.
        So a newcomer's short prompt starts within an iteration or two, whatever prompts
        fill the batch; at most one swap per iteration bounds the churn."""
        prefilling = [s for s in self._running if not self._by_step(s)]
        if not prefilling:
            return
        longest = max(prefilling, key=lambda s: len(s.pending))
        shortest = min(self._waiting, key=lambda s: len(s.pending))
        margin = PREEMPT_MARGIN_CHUNKS * self.model.prefill_chunk
        if len(longest.pending) - len(shortest.pending) < margin:
            return
        self._running.remove(longest)
        longest.status = Status.WAITING
        self._waiting.remove(shortest)
        self._waiting.appendleft(longest)
        self._join(shortest, now)
        self.stats.preemptions += 1

    def _prefill_groups(self) -> dict[int, list[Sequence]]:
        """Streams consuming their prompt, the least prompt left first (the oldest among
        equals: a short prompt never waits behind long ones) while the budget lasts (at
        least one), grouped by chunk length so each group is one [G, length] graph run."""
        groups: dict[int, list[Sequence]] = {}
        budget = self.config.prefill_tokens_per_iteration
        prefilling = [s for s in self._running if not self._by_step(s)]
        for seq in sorted(prefilling, key=lambda s: len(s.pending)):
            length = min(len(seq.pending), self.model.prefill_chunk)
            if groups and length > budget:
                break
            groups.setdefault(length, []).append(seq)
            budget -= length
        return groups

    def _by_step(self, seq: Sequence) -> bool:
        """Whether the stream feeds one token through the step graph this iteration: a
        sampled token, any input of a model without a prefill graph, or a step request's
        single token (so client-driven sequences share the decode batch)."""
        return (
            seq.status is Status.RUNNING
            or not self._prefill
            or (seq.sampler is None and len(seq.pending) == 1)
        )

    def _run(self, graph: str, rows: list[Sequence], tokens: np.ndarray):
        """Run `rows` through `graph`; on an exception, each row alone. Returns the rows
        whose input is now consumed, with their logits [V]."""
        try:
            start = time.perf_counter()
            if self.bind and graph == "step":
                logits, state = self._bound_run(rows, tokens)
            else:
                logits, state = self._padded_run(graph, tokens, self._gather(rows))
            self.observer.run(graph, len(rows), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a row's failure must stay that row's
            if len(rows) == 1:
                log.error(
                    "%s: %s graph failed for stream %d: %r", self.model.name, graph, rows[0].id, exc
                )
                self._leave(rows[0], "error", _internal(exc))
                return []
            ready = []
            for i, seq in enumerate(rows):
                ready += self._run(graph, [seq], tokens[i : i + 1])
            return ready
        ready = []
        if state is not None:  # None: it stays on the device (`_bound_run`)
            self._scatter(rows, state)
        for i, seq in enumerate(rows):
            seq.pending = seq.pending[tokens.shape[1] :]
            if not len(seq.pending):
                ready.append((seq, logits[i]))
        return ready

    def _padded_run(self, graph: str, tokens: np.ndarray, state: dict):
        n = len(tokens)
        tokens, state = self._pad(tokens, state)
        logits, new = self.model.run(graph, tokens, state)
        return logits[:n], new  # state rows past n are never scattered

    def _pad(self, tokens: np.ndarray, state: dict | None):
        """Tokens and state filled to `pad_to` rows with `eos` and zero rows (no-op when
        not padding); `state` None pads the tokens alone."""
        fill = self.pad_to - len(tokens)
        if fill <= 0:
            return tokens, state
        tokens = np.concatenate([tokens, np.full((fill, tokens.shape[1]), self.model.eos)])
        if state is not None:
            zeros = self.model.zero_state(fill)
            state = {
                name: np.concatenate([value, zeros[name]], axis=self._axis[name])
                for name, value in state.items()
            }
        return tokens, state

    def _bound_run(self, rows: list[Sequence], tokens: np.ndarray):
        """A decode run with the batch's state kept on the device. The same streams in
        the same order as last time feed the last run's state OrtValues back as they
        are; any other batch first brings that state home (`_settle`) and uploads its
        own. Returns (logits [B, V], None): the new state stays resident."""
        resident = self._resident
        if resident is not None and _same(resident[0], rows):
            state = resident[1]
        else:
            self._settle()
            _, host = self._pad(tokens, self._gather(rows))
            state = {name: self.model.to_device(value) for name, value in host.items()}
            self.stats.state_uploads += 1
        logits, new = self.model.run_bound("step", self._pad(tokens, None)[0], state)
        self._resident = (list(rows), new)
        return logits[: len(rows)], None

    def _settle(self) -> None:
        """Copy the resident batch's state to the host, into each of its streams'
        `seq.state`, and forget it (a stream joins or leaves, or a step request is
        answered with its state)."""
        if self._resident is None:
            return
        rows, state = self._resident
        self._resident = None
        host = {name: self.model.to_host(value) for name, value in state.items()}
        self.stats.state_downloads += 1
        self._scatter([s for s in rows if s.status is not Status.FINISHED], host, rows)

    def _scatter(self, seqs: list[Sequence], state: dict, rows: list[Sequence] | None = None):
        """Each stream's row of the batched `state` (rows in `rows` order, default
        `seqs`) becomes its `seq.state`."""
        index = {id(s): i for i, s in enumerate(rows or seqs)}
        for seq in seqs:
            i = index[id(seq)]
            seq.state = {name: _row(value, self._axis[name], i) for name, value in state.items()}

    def _gather(self, rows: list[Sequence]) -> dict[str, np.ndarray]:
        states = [s.state or self._zero for s in rows]
        if len(rows) == 1:
            return states[0]
        return {
            name: np.concatenate([s[name] for s in states], axis=axis)
            for name, axis in self._axis.items()
        }

    def _sample(self, ready: list[tuple[Sequence, np.ndarray]]) -> None:
        logits = np.stack([row for _, row in ready])  # [R, V]
        finite = np.all(np.isfinite(logits), axis=1)
        graph = logits  # what the graph gave: a step request's answer
        if self.model.never_sampled:  # never sampled: masked for the samplers alone
            logits = logits.copy()
            logits[:, self.model.never_sampled] = -np.inf
        seqs = [s for (s, _), ok in zip(ready, finite, strict=True) if ok]
        for (seq, _), ok in zip(ready, finite, strict=True):
            if not ok:
                self._leave(
                    seq, "error", NonFiniteOutput(f"{self.model.name} produced non-finite logits")
                )
        now = self.clock()
        rows = {id(s): i for i, (s, _) in enumerate(ready)}
        for seq in [s for s in seqs if s.sampler is None]:  # step requests: logits back
            self._answer(seq, graph[rows[id(seq)]], now)
        seqs = [s for s in seqs if s.sampler is not None]
        if not seqs:
            return
        picked = [rows[id(s)] for s in seqs]
        tokens, logprobs = sample_rows(logits[picked], [s.sampler for s in seqs], self.model.eos)
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            self._deliver(seq, int(token), lp, now)

    def _answer(self, seq: Sequence, logits: np.ndarray, now: float) -> None:
        seq.first_token = seq.first_token or now
        if self._resident is not None and any(s is seq for s in self._resident[0]):
            self._settle()  # its state is on the device
        # Copies: its rows are views into the whole batch's state array, which a client's
        # idle sequence would otherwise keep alive (every row of it) until it ends.
        state = {name: np.array(value) for name, value in seq.state.items()}

        def add(d: Delta) -> None:
            d.logits, d.state = logits.copy(), state

        seq.outbox.put(add)
        self._leave(seq, "stepped")

    def _deliver(self, seq: Sequence, token: int, logprob, now: float) -> None:
        if seq.first_token:
            self.observer.token(now - seq.last_token)
        else:
            seq.first_token = now
            self.observer.first_token(now - seq.submitted)
        seq.last_token = now
        seq.status = Status.RUNNING
        text, stopped = ("", False) if token == self.model.eos else seq.output.push(token)

        def add(d: Delta) -> None:
            d.tokens.append(token)
            if text:
                d.pieces.append(text)
            if logprob is not None:
                d.logprobs.append(logprob)

        seq.outbox.put(add)
        if token == self.model.eos:
            self._leave(seq, "eos")
        elif stopped:
            self._leave(seq, "stop")
        elif seq.sampler.produced >= seq.max_tokens:
            self._leave(seq, "length")
        else:
            seq.pending = np.asarray([token], np.int64)

    def _leave(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        self.stats.leaves += 1  # counted before the client can see the finish
        self.stats.finish_reasons[reason] += 1
        seq.finish(reason, error)

    def fail_all(self, error: Exception) -> None:
        """Fail every stream (the loop itself broke); the scheduler stays usable."""
        with self._lock:
            everyone = [*self._running, *self._waiting]
            self._running, self._waiting = [], deque()
        for seq in everyone:
            if seq.status is not Status.FINISHED:
                try:
                    self._leave(seq, "error", error)
                except Exception:  # noqa: BLE001 - one stream's outbox must not stop the rest
                    log.exception("%s: could not fail stream %d", self.model.name, seq.id)


def _on_cuda(model) -> bool:
    return getattr(model, "provider", "") == "CUDAExecutionProvider"


def _same(a: list[Sequence], b: list[Sequence]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _row(value: np.ndarray, axis: int, i: int) -> np.ndarray:
    index = [slice(None)] * value.ndim
    index[axis] = slice(i, i + 1)
    return value[tuple(index)]


def _internal(exc: Exception) -> ServingError:
    if isinstance(exc, ServingError):
        return exc
    return ServingError(f"the model failed on this request: {type(exc).__name__}")


# A waiting prompt swaps a prefilling stream out of a full batch only when it has at
# least this many chunks less to prefill: short prompts first, without swapping equals.
PREEMPT_MARGIN_CHUNKS = 4

CLOSE_TIMEOUT_S = 10.0  # at most one iteration's wait; far above any iteration


class StepEngine:
    """A scheduler and the thread that runs its iterations while there is work."""

    def __init__(
        self, model, config: EngineConfig = EngineConfig(), observer: EngineObserver | None = None
    ):
        self._cond = threading.Condition()
        self.scheduler = Scheduler(model, config, wake=self._wake, observer=observer)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._leases = Leases()

    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    def lease(self):
        """Held by a request from the moment it picks this engine until it is done with
        it (`serving.core.leases`)."""
        return self._leases.hold()

    def busy(self) -> bool:
        """Whether requests hold it or streams are in it."""
        return self._leases.held or self.scheduler.has_work()

    def submit(self, seq: Sequence) -> None:
        with self._cond:  # re-entrant: the scheduler's wake-up takes it too
            if self._stopped:
                raise Unavailable(f"{self.scheduler.model.name}: the server is shutting down")
            self.scheduler.submit(seq)  # under the lock, so close() cannot slip between
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"engine-{self.scheduler.model.name}", daemon=True
                )
                self._thread.start()

    def cancel(self, seq: Sequence) -> None:
        self.scheduler.cancel(seq)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self.scheduler.has_work())
                if self._stopped:
                    return
            try:
                self.scheduler.step()
            except Exception as exc:  # noqa: BLE001 - the engine must outlive any bug
                log.exception("%s: scheduler iteration failed", self.scheduler.model.name)
                try:
                    self.scheduler.fail_all(_internal(exc))
                except Exception:  # noqa: BLE001 - nor may failing its streams end it
                    log.exception("%s: failing the batch failed", self.scheduler.model.name)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.scheduler.fail_all(Unavailable("the server is shutting down"))
        # Wait out the iteration in flight: a daemon thread still inside ONNX Runtime when
        # the interpreter exits aborts the process ("terminate called ...").
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_TIMEOUT_S)


def run_alone(model, seq: Sequence, config: EngineConfig = EngineConfig()) -> Iterator[Delta]:
    """Run one sequence to its end on a private scheduler in this thread, yielding each
    delta as it is produced (tests, tools, and a reference for batch invariance)."""
    scheduler = Scheduler(model, config)
    scheduler.submit(seq)
    while True:
        scheduler.step()
        delta = seq.outbox.take(timeout=0)
        if delta is not None:
            yield delta
            if delta.finished:
                return
