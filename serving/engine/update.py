"""What an iteration's logits become for the clients (vLLM's output processor):

- the streams whose input is consumed sample their next token together
  (`serving.engine.sampler.sample_rows`, each with its own parameters and generator),
  and each token goes through the stream's output processor into its outbox;
- a step request is answered with the graph's logits and its state;
- a beam search takes its next beams, and its words once they are decided;
- jobs finish with a reason ("eos", "stop", "length", "stepped", "cancelled",
  "deadline", "error"), counted in the engine's stats before the client can see it.

A row whose logits are not finite fails alone. No gRPC: the transport takes from the
outboxes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from serving.engine.beam import BeamSearch
from serving.engine.request import Delta, Sequence, Status
from serving.engine.runner import Outputs, Runner
from serving.engine.sampler import sample_rows
from serving.engine.stats import EngineObserver, EngineStats
from serving.errors import NonFiniteOutput

if TYPE_CHECKING:
    from serving.engine.scheduler import Job


class Update:
    """Delivers an iteration's `Outputs` and finishes jobs; `update(outputs)`."""

    def __init__(
        self,
        model,
        runner: Runner,
        stats: EngineStats,
        observer: EngineObserver,
        clock: Callable[[], float],
    ):
        self.model, self.runner, self.stats = model, runner, stats
        self.observer, self.clock = observer, clock

    def __call__(self, outputs: Outputs) -> None:
        for job, error in outputs.failed:
            self.leave(job, "error", error)
        ready, beams = [], []
        for item in outputs.ready:
            (beams if isinstance(item[0], BeamSearch) else ready).append(item)
        if ready:
            self._sample(ready)
        for job, logits in beams:
            self._advance(job, logits)

    def leave(self, job: Job, reason: str, error: Exception | None = None) -> None:
        self.stats.leaves += 1  # counted before the client can see the finish
        self.stats.finish_reasons[reason] += 1
        job.finish(reason, error)

    def leave_all(self, left: list[tuple[Job, str, Exception | None]]) -> None:
        for job, reason, error in left:
            self.leave(job, reason, error)

    def _sample(self, ready: list[tuple[Sequence, np.ndarray]]) -> None:
        logits = np.concatenate([row for _, row in ready])  # [R, V]
        finite = np.isfinite(logits).all(axis=1).tolist()
        graph = logits  # what the graph gave: a step request's answer
        if self.model.never_sampled:  # never sampled: masked for the samplers alone
            logits = logits.copy()
            logits[:, self.model.never_sampled] = -np.inf
        now = self.clock()
        seqs, picked, answers = [], [], []
        for i, ((seq, _), ok) in enumerate(zip(ready, finite, strict=True)):
            if not ok:
                self.leave(
                    seq, "error", NonFiniteOutput(f"{self.model.name} produced non-finite logits")
                )
            elif seq.sampler is None:  # a step request: logits back
                answers.append((seq, i))
            else:
                seqs.append(seq)
                picked.append(i)
        for seq, i in answers:
            self._answer(seq, graph[i], now)
        if not seqs:
            return
        if len(picked) < len(logits):
            logits = logits[picked]
        tokens, logprobs = sample_rows(logits, [s.sampler for s in seqs], self.model.eos)
        gaps = []  # the observer hears of the iteration's tokens at once
        for seq, token, lp in zip(seqs, tokens.tolist(), logprobs, strict=True):
            if seq.first_token:
                gaps.append(now - seq.last_token)
            else:
                seq.first_token = now
                self.observer.first_token(now - seq.submitted)
            seq.last_token = now
            self._deliver(seq, token, lp)
        if gaps:
            self.observer.tokens(gaps)

    def _answer(self, seq: Sequence, logits: np.ndarray, now: float) -> None:
        """logits: [V], as the graph gave them."""
        seq.first_token = seq.first_token or now
        self.runner.fetch(seq)  # its state may be on the device
        # Copies: its rows are views into the whole batch's state array, which a client's
        # idle sequence would otherwise keep alive (every row of it) until it ends.
        state = {name: np.array(value) for name, value in seq.state.items()}

        def add(d: Delta) -> None:
            d.logits, d.state = logits.copy(), state

        seq.outbox.put(add)
        self.leave(seq, "stepped")

    def _deliver(self, seq: Sequence, token: int, logprob) -> None:
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
            self.leave(seq, "eos")
        elif stopped:
            self.leave(seq, "stop")
        elif seq.sampler.produced >= seq.max_tokens:
            self.leave(seq, "length")
        else:
            seq.pending = np.asarray([token], np.int64)

    def _advance(self, job: BeamSearch, logits: np.ndarray) -> None:
        """logits: [k, V], a row per live beam."""
        try:
            keep, words = job.advance(logits)
        except NonFiniteOutput as exc:
            self.leave(job, "error", exc)
            return
        now = self.clock()
        if job.last_token:  # a token per beam per step: the observer hears of each step
            self.observer.token(now - job.last_token)
        else:
            self.observer.first_token(now - job.submitted)
        job.last_token, job.status = now, Status.RUNNING
        if keep is None:  # ended: `finish` delivers the last words with the beams
            best = job.beams[0] if job.beams else None
            self.leave(job, "eos" if best and best.finished else "length")
            return
        if words:
            job.first_token = job.first_token or now
            job.outbox.put(lambda d: d.pieces.extend(words))
        if len(keep) != len(logits) or np.any(keep != np.arange(len(keep))):
            self.runner.keep_rows(job, keep)
