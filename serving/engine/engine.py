"""Continuous (iteration-level) batching of one step model's jobs: decide, run, deliver.

An iteration (`EngineCore.step`) is
    plan = scheduler.schedule(now)   # who leaves, who joins, what runs (`scheduler`)
    outputs = runner.run(plan)       # gather state, run the graphs, scatter (`runner`)
    update(outputs)                  # sample, deliver, finish (`update`)
and the three count what they do in one `EngineStats`. `StepEngine` runs iterations on a
thread of its own while there is work; `run_alone` runs one job in the caller's thread.
No gRPC here: the transport submits jobs (`Sequence`, `BeamSearch`) and takes `Delta`s
from their outboxes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from serving.core.leases import Leases
from serving.engine.request import Delta, Status, batched_wakes
from serving.engine.runner import Runner, as_serving_error
from serving.engine.scheduler import EngineConfig, Scheduler
from serving.engine.stats import EngineObserver, EngineStats
from serving.engine.update import Update
from serving.errors import Unavailable

if TYPE_CHECKING:
    from serving.engine.scheduler import Job

log = logging.getLogger(__name__)


class EngineCore:
    """The scheduler, the runner and the update of one model, one iteration per `step()`
    in the caller's thread (`StepEngine`'s, or a test's, or `run_alone`'s)."""

    def __init__(
        self,
        model,
        config: EngineConfig | None = None,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        observer: EngineObserver | None = None,
        stats: EngineStats | None = None,
    ):
        """`stats`: where it counts (the model's, `serving.metrics.statistics`); a new
        object when not given."""
        config, observer = config or EngineConfig(), observer or EngineObserver()
        self.clock = clock
        self.stats = stats if stats is not None else EngineStats()
        self.scheduler = Scheduler(model, config, wake, self.stats)
        self.runner = Runner(model, config, self.stats, observer)
        self.update = Update(model, self.runner, self.stats, observer, clock)

    @property
    def model(self):
        return self.scheduler.model

    def submit(self, job: Job) -> None:
        """Queue `job`; ResourceExhausted when the queue is full."""
        self.scheduler.submit(job)

    def cancel(self, job: Job) -> None:
        """Safe from any thread: the job leaves at the start of the next iteration."""
        self.scheduler.cancel(job)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> int:
        """Run one iteration; the number of jobs that ran in it."""
        plan = self.scheduler.schedule(self.clock())
        self.update.leave_all(plan.left)  # the cancelled and timed-out hear at once
        if not plan.jobs:
            return 0
        self.update(self.runner.run(plan))
        self.scheduler.drop_finished()
        return plan.jobs

    def fail_all(self, error: Exception) -> None:
        """Fail every job (the loop itself broke); the engine stays usable."""
        for job in self.scheduler.clear():
            if job.status is not Status.FINISHED:
                try:
                    self.update.leave(job, "error", error)
                except Exception:  # noqa: BLE001 - one job's outbox must not stop the rest
                    log.exception("%s: could not fail stream %d", self.model.name, job.id)


CLOSE_TIMEOUT_S = 10.0  # at most one iteration's wait; far above any iteration


class StepEngine:
    """An engine core and the thread that runs its iterations while there is work."""

    def __init__(
        self,
        model,
        config: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        stats: EngineStats | None = None,
    ):
        self._cond = threading.Condition()
        self.core = EngineCore(model, config, wake=self._wake, observer=observer, stats=stats)
        self.scheduler = self.core.scheduler  # occupancy(), live, config: from any thread
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._leases = Leases()

    @property
    def model(self):
        """The model it batches (a reload swaps the engine with the model)."""
        return self.core.model

    @property
    def stats(self) -> EngineStats:
        return self.core.stats

    @property
    def closed(self) -> bool:
        """Whether `close()` was called: it takes no more jobs."""
        return self._stopped

    @property
    def available(self) -> bool:
        """Whether it takes jobs now (an engine in another process may not, for a while)."""
        return not self._stopped

    def occupancy(self) -> tuple[int, int]:
        """(jobs in the batch, jobs waiting for rows), from any thread."""
        return self.scheduler.occupancy()

    def lease(self):
        """Held by a request from the moment it picks this engine until it is done with
        it (`serving.core.leases`)."""
        return self._leases.hold()

    def busy(self) -> bool:
        """Whether requests hold it or jobs are in it."""
        return self._leases.held or self.scheduler.has_work()

    def submit(self, job: Job) -> None:
        """Queue a job (`Sequence`, `BeamSearch`) for the batch; its deltas come to
        `job.outbox`. Unavailable once closed, ResourceExhausted when the queue is full."""
        with self._cond:  # re-entrant: the scheduler's wake-up takes it too
            if self._stopped:
                raise Unavailable(f"{self.model.name}: the server is shutting down")
            self.core.submit(job)  # under the lock, so close() cannot slip between
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"engine-{self.model.name}", daemon=True
                )
                self._thread.start()

    def cancel(self, job: Job) -> None:
        self.core.cancel(job)

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
                with batched_wakes():  # one wake-up per event loop per iteration
                    self.core.step()
            except Exception as exc:  # noqa: BLE001 - the engine must outlive any bug
                log.exception("%s: engine iteration failed", self.model.name)
                try:
                    self.core.fail_all(as_serving_error(exc))
                except Exception:  # noqa: BLE001 - nor may failing its streams end it
                    log.exception("%s: failing the batch failed", self.model.name)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.core.fail_all(Unavailable("the server is shutting down"))
        # Wait out the iteration in flight: a daemon thread still inside ONNX Runtime when
        # the interpreter exits aborts the process ("terminate called ...").
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_TIMEOUT_S)


def run_alone(
    model, job: Job, config: EngineConfig | None = None, stats: EngineStats | None = None
) -> Iterator[Delta]:
    """Run one job to its end on a private engine core in this thread, yielding each
    delta as it is produced (tests, tools, and a reference for batch invariance); what
    it did is counted in `stats` when given."""
    core = EngineCore(model, config, stats=stats)
    core.submit(job)
    while True:
        core.step()
        delta = job.outbox.take(timeout=0)
        if delta is not None:
            yield delta
            if delta.finished:
                return
