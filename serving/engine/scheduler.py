"""Which jobs step next: the decisions of continuous (iteration-level) batching, and
nothing else (no graph run, no sampling), so a fake model tests it in microseconds.

At every iteration `schedule(now)` returns a `Plan`:
- the cancelled and the timed-out leave (the plan says who and why);
- waiting jobs join while the batch has rows for them, first come first served (a
  stream holds one row, a beam search up to `beam_size`); with the batch full, a
  waiting short prompt swaps out the stream with the most prompt still to prefill;
- every job feeding one token per row through the step graph (a sampled token, a step
  request's single token, a beam search's beams, any input of a model without a
  prefill graph) is in the decode set, one [B, 1] run;
- each stream still consuming its prompt gets its next chunk (`model.prefill_chunk`
  tokens, the least prompt left first) while the iteration's prefill budget lasts, so a
  long prompt never stalls the running streams for more than one chunk per iteration,
  and never delays a short one; equal chunk lengths make one [G, length] run.

The runner (`serving.engine.runner`) runs the plan, the update (`serving.engine.update`)
delivers what came out and finishes jobs, and `drop_finished()` frees their rows.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.engine.request import Sequence, Status
from serving.engine.stats import EngineStats
from serving.errors import DeadlineExceeded, ResourceExhausted

if TYPE_CHECKING:
    from serving.engine.beam import BeamSearch

    Job = Sequence | BeamSearch


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64  # rows stepped together per iteration (a stream each)
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
class Plan:
    """One iteration's decisions."""

    decode: list[Job] = field(default_factory=list)  # one [B, 1] step run, B their rows
    prefill: dict[int, list[Sequence]] = field(default_factory=dict)  # chunk length ->
    # the streams whose next chunk it is: one [G, length] prefill run each
    left: list[tuple[Job, str, Exception | None]] = field(default_factory=list)  # (job,
    # "cancelled" or "deadline", the error its client gets): out of the batch already

    @property
    def jobs(self) -> int:
        """How many jobs run in it."""
        return len(self.decode) + sum(len(group) for group in self.prefill.values())


# A waiting prompt swaps a prefilling stream out of a full batch only when it has at
# least this many chunks less to prefill: short prompts first, without swapping equals.
PREEMPT_MARGIN_CHUNKS = 4


class Scheduler:
    """The waiting queue and the batch. `submit`, `cancel`, `occupancy` and `has_work`
    are safe from any thread; `schedule` and `drop_finished` run on the engine's."""

    def __init__(
        self,
        model,
        config: EngineConfig = EngineConfig(),
        wake: Callable[[], None] = lambda: None,
        stats: EngineStats | None = None,
    ):
        self.model, self.config, self.wake = model, config, wake
        self.stats = stats if stats is not None else EngineStats()
        self._lock = threading.Lock()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._prefill = "prefill" in model.graphs

    @property
    def live(self) -> int:
        return len(self._waiting) + len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def occupancy(self) -> tuple[int, int]:
        """(jobs in the batch, jobs waiting for rows), from any thread. A job that
        finished this iteration is out already: its client may have its end before the
        iteration drops it from the batch."""
        with self._lock:
            running = sum(1 for s in self._running if s.status is not Status.FINISHED)
            return running, len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._waiting) >= self.config.max_queue_size:
                self.stats.refused += 1
                raise ResourceExhausted(
                    f"{self.model.name}: {len(self._running)} streams running and "
                    f"{len(self._waiting)} queued, the most allowed; retry later"
                )
            self._waiting.append(job)
        self.wake()

    def cancel(self, job: Job) -> None:
        """Safe from any thread: the job leaves at the start of the next iteration."""
        job.cancelled = True
        self.wake()

    def clear(self) -> list[Job]:
        """Every job, running and waiting, out of the scheduler (to be failed: the loop
        itself broke, or the engine closes); the scheduler stays usable."""
        with self._lock:
            everyone = [*self._running, *self._waiting]
            self._running, self._waiting = [], deque()
        return everyone

    # -- one iteration ------------------------------------------------------------------

    def schedule(self, now: float) -> Plan:
        """Who leaves, who joins, and what runs at this iteration."""
        plan = Plan()
        self._running = [s for s in self._running if not self._gone(s, now, plan.left)]
        self._admit(now, plan.left)
        if not self._running:
            return plan
        self.stats.iterations += 1
        if self._prefill:
            prefilling = []
            for job in self._running:
                (plan.decode if job.feeds_by_step else prefilling).append(job)
            if prefilling:
                plan.prefill = self._prefill_groups(prefilling)
        else:
            plan.decode = list(self._running)
        return plan

    def drop_finished(self) -> None:
        """After the iteration's results are delivered: the jobs that ended give back
        their rows."""
        self._running = [s for s in self._running if s.status is not Status.FINISHED]

    def _gone(self, job: Job, now: float, left: list) -> bool:
        """Cancelled or past its deadline: the job leaves (and `left` says why)."""
        if job.status is Status.FINISHED:
            return True
        if job.cancelled:
            left.append((job, "cancelled", None))
        elif job.deadline is not None and now > job.deadline:
            left.append((job, "deadline", DeadlineExceeded("the deadline passed")))
        else:
            return False
        return True

    def _admit(self, now: float, left: list) -> None:
        with self._lock:
            if any(s.cancelled or s.deadline is not None for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not self._gone(s, now, left))
            if not self._waiting:
                return
            rows = sum(s.max_rows for s in self._running)
            while self._waiting and (
                rows + self._waiting[0].max_rows <= self.config.max_batch_size
                or not self._running  # wider than the batch: it runs alone
            ):
                rows += self._waiting[0].max_rows
                self._join(self._waiting.popleft(), now)
            if self._waiting and self._prefill:
                self._swap_in_shortest(now)

    def _join(self, job: Job, now: float) -> None:
        job.status, job.joined = Status.PREFILL, job.joined or now  # first join: queue time
        self._running.append(job)
        self.stats.joins += 1

    def _swap_in_shortest(self, now: float) -> None:
        """Under the lock, the batch full and streams waiting: the waiting stream with the
        least prompt left takes the row of the running stream with the most still to
        prefill, when that is PREEMPT_MARGIN_CHUNKS chunks more; the stream swapped out
        keeps its state and waits at the head of the queue, to resume where it stopped.
        So a newcomer's short prompt starts within an iteration or two, whatever prompts
        fill the batch; at most one swap per iteration bounds the churn. (A job of
        several rows waits its turn.)"""
        prefilling = [s for s in self._running if not s.feeds_by_step]
        one_row = [s for s in self._waiting if s.max_rows == 1]
        if not prefilling or not one_row:
            return
        longest = max(prefilling, key=lambda s: len(s.pending))
        shortest = min(one_row, key=lambda s: len(s.pending))
        margin = PREEMPT_MARGIN_CHUNKS * self.model.prefill_chunk
        if len(longest.pending) - len(shortest.pending) < margin:
            return
        self._running.remove(longest)
        longest.status = Status.WAITING
        self._waiting.remove(shortest)
        self._waiting.appendleft(longest)
        self._join(shortest, now)
        self.stats.preemptions += 1

    def _prefill_groups(self, prefilling: list[Sequence]) -> dict[int, list[Sequence]]:
        """Streams consuming their prompt, the least prompt left first (the oldest among
        equals: a short prompt never waits behind long ones) while the budget lasts (at
        least one), grouped by chunk length so each group is one [G, length] graph run."""
        groups: dict[int, list[Sequence]] = {}
        budget = self.config.prefill_tokens_per_iteration
        for seq in sorted(prefilling, key=lambda s: len(s.pending)):
            length = min(len(seq.pending), self.model.prefill_chunk)
            if groups and length > budget:
                break
            groups.setdefault(length, []).append(seq)
            budget -= length
        return groups
