"""Runs a plan's graph calls: gathers the jobs' state rows into one batch (along the
card's batch axis of each tensor), pads it when asked, runs the step or prefill graph,
and scatters the new state back into each job.

One step-graph call runs the plan's decode set ([B, 1]: a row per stream, a row per
live beam), one prefill-graph call each group of equal chunk lengths ([G, length]).
While the same jobs step again, the decode batch's state stays as the last run gave it
(resident) and is fed back whole: no gather, no scatter. With bound state
(`EngineConfig.bind_state`) it stays on the model's device (ONNX Runtime I/O binding);
without, as the host arrays the run returned. It is scattered into each job's
`job.state` when the batch changes, or by `fetch` when the update needs one job's.

A graph run that raises is retried one job at a time, so a request that breaks the
graph fails alone (`Outputs.failed`; the update finishes it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from serving.engine.request import Status
from serving.engine.scheduler import EngineConfig, Plan
from serving.engine.stats import EngineObserver, EngineStats
from serving.errors import ServingError

if TYPE_CHECKING:
    from serving.engine.scheduler import Job

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """What one iteration's graph runs gave."""

    ready: list[tuple[Job, np.ndarray]] = field(default_factory=list)  # jobs whose input
    # is all consumed, with the logits after it: [rows, V], a row per row of the job
    failed: list[tuple[Job, Exception]] = field(default_factory=list)  # the graph raised


class Runner:
    """The model's graphs run on the jobs' state; a thin wrapper over ONNX Runtime."""

    def __init__(
        self,
        model,
        config: EngineConfig | None = None,
        stats: EngineStats | None = None,
        observer: EngineObserver | None = None,
    ):
        config = config or EngineConfig()
        self.model = model
        self.stats = stats if stats is not None else EngineStats()
        self.observer = observer or EngineObserver()
        self._zero = model.zero_state(1)
        self._axis = model.state_axis
        pad = config.pad_batches
        self.pad_to = config.max_batch_size if (pad is None and _on_cuda(model)) or pad else 0
        bind = config.bind_state
        self.bind = _on_cuda(model) if bind is None else bind
        # The decode batch whose state is resident: its jobs in row order, their row
        # counts and the state (OrtValues on the device when bound, else the host arrays
        # the run returned); their `job.state` is stale while it lives.
        self._resident: tuple[list[Job], list[int], dict] | None = None

    def run(self, plan: Plan) -> Outputs:
        out = Outputs()
        if plan.decode:
            tokens = np.concatenate([s.pending[: s.rows] for s in plan.decode])[:, None]  # [B, 1]
            self._run("step", plan.decode, tokens, out)
            self.stats.step_runs += 1
            self.stats.batch_sizes[len(tokens)] += 1
        for length, group in plan.prefill.items():
            tokens = np.stack([s.pending[:length] for s in group])  # [G, length]
            self._run("prefill", group, tokens, out)
            self.stats.prefill_runs += 1
        return out

    def _run(self, graph: str, jobs: list[Job], tokens: np.ndarray, out: Outputs) -> None:
        """Run `jobs` (tokens [rows, T]) through `graph`; on an exception, each job alone."""
        counts = [s.rows for s in jobs]
        try:
            start = time.perf_counter()
            if graph == "step":
                logits, state = self._resident_run(jobs, counts, tokens)
            else:
                logits, state = self.padded_run(graph, tokens, self._gather(jobs))
        except Exception as exc:  # noqa: BLE001 - a job's failure must stay that job's
            if len(jobs) == 1:
                log.error(
                    "%s: %s graph failed for stream %d: %r", self.model.name, graph, jobs[0].id, exc
                )
                out.failed.append((jobs[0], as_serving_error(exc)))
                return
            row = 0
            for job, n in zip(jobs, counts, strict=True):
                self._run(graph, [job], tokens[row : row + n], out)
                row += n
            return
        # Outside the try: the jobs have stepped, and a retry would step them again.
        self.observer.run(graph, len(tokens), time.perf_counter() - start)
        if state is not None:  # None: it stays resident (`_resident_run`)
            self._scatter(jobs, counts, state)
        row, width = 0, tokens.shape[1]
        for job, n in zip(jobs, counts, strict=True):
            job.pending = job.pending[n * width :]
            if not len(job.pending):
                out.ready.append((job, logits[row : row + n]))
            row += n

    def padded_run(self, graph: str, tokens: np.ndarray, state: dict):
        """tokens [B, T] and batched state -> (logits [B, V], the new state, its rows
        past B padding), run at `pad_to` rows when padding."""
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

    def _resident_run(self, jobs: list[Job], counts: list[int], tokens: np.ndarray):
        """A decode run with the batch's state resident: the same jobs in the same order
        as last time feed the last run's state back as it is; any other batch first
        scatters that state into its jobs (`_settle`) and gathers its own. Bound, the
        state is OrtValues on the device (uploaded when gathered); else the host arrays
        the run returned. Returns (logits [B, V], None): the new state stays resident."""
        resident = self._resident
        if resident is not None and _same(resident[0], jobs):
            state = resident[2]
        else:
            self._settle()
            _, state = self._pad(tokens, self._gather(jobs))
            if self.bind:
                state = {name: self.model.to_device(value) for name, value in state.items()}
                self.stats.state_uploads += 1
        run = self.model.run_bound if self.bind else self.model.run
        logits, new = run("step", self._pad(tokens, None)[0], state)
        self._resident = (list(jobs), counts, new)
        return logits[: len(tokens)], None

    def fetch(self, job: Job) -> None:
        """Make `job.state` current on the host: when its rows live on the device, the
        resident batch's state comes home (a step request is answered with its state; a
        beam search reorders its rows)."""
        if self._resident is not None and any(s is job for s in self._resident[0]):
            self._settle()

    def keep_rows(self, job: Job, rows: np.ndarray) -> None:
        """A job's state becomes its `rows` [k'], in that order (a beam search's new beams
        continue from these rows of the old)."""
        self.fetch(job)
        job.state = {
            name: np.take(value, rows, axis=self._axis[name]) for name, value in job.state.items()
        }

    def _settle(self) -> None:
        """Scatter the resident batch's state (copied to the host when bound) into each of
        its unfinished jobs' `job.state`, and forget it (a job joins or leaves, or
        `fetch`)."""
        if self._resident is None:
            return
        jobs, counts, state = self._resident
        self._resident = None
        if self.bind:
            state = {name: self.model.to_host(value) for name, value in state.items()}
            self.stats.state_downloads += 1
        self._scatter(jobs, counts, state, skip_finished=True)

    def _scatter(
        self, jobs: list[Job], counts: list[int], state: dict, skip_finished: bool = False
    ) -> None:
        """Each job's rows of the batched `state` (jobs in row order, `counts` rows each)
        become its `job.state`."""
        # Per tensor, the index up to its batch axis, built once for the whole batch.
        lead = [(name, value, (slice(None),) * self._axis[name]) for name, value in state.items()]
        start = 0
        for job, n in zip(jobs, counts, strict=True):
            if not (skip_finished and job.status is Status.FINISHED):
                rows = slice(start, start + n)
                job.state = {name: value[pre + (rows,)] for name, value, pre in lead}
            start += n

    def _gather(self, jobs: list[Job]) -> dict[str, np.ndarray]:
        states = [s.state or self._zero for s in jobs]
        if len(jobs) == 1:
            return states[0]
        return {
            name: np.concatenate([s[name] for s in states], axis=axis)
            for name, axis in self._axis.items()
        }


def _on_cuda(model) -> bool:
    return getattr(model, "provider", "") == "CUDAExecutionProvider"


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def as_serving_error(exc: Exception) -> ServingError:
    """What a client hears of an exception the model (or the engine) raised."""
    if isinstance(exc, ServingError):
        return exc
    return ServingError(f"the model failed on this request: {type(exc).__name__}")
