"""A stream as a plain object: what it still has to feed, how it samples, where its
output goes, and its status. No thread, no generator: the scheduler moves these
between its queues and rebuilds the batch from them at every iteration. (A beam search,
`serving.engine.beam.BeamSearch`, is a job of the same shape holding several rows.)
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from serving.engine.output import Output
from serving.engine.sampler import Sampler, TokenLogprob

_ids = itertools.count(1)


def next_id() -> int:
    """A job's id, unique in this process (for logs)."""
    return next(_ids)


class Status(enum.Enum):
    WAITING = "waiting"  # queued, not yet in the batch
    PREFILL = "prefill"  # in the batch, consuming its prompt
    RUNNING = "running"  # in the batch, one sampled token per iteration
    FINISHED = "finished"


@dataclass
class Delta:
    """Everything a stream produced since its client last took from it."""

    pieces: list[str] = field(default_factory=list)  # text of each token (a word of a
    # caption; a beam search's words once decided), stop strings applied
    tokens: list[int] = field(default_factory=list)  # sampled ids, EOS included
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    # Set once finished:
    finish_reason: str = ""  # "length", "stop", "eos", "cancelled", "deadline" or "error"
    error: Exception | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int = 0
    queue_time_us: int = 0  # submitted -> joined the batch
    time_to_first_token_us: int = 0  # submitted -> first token sampled
    # A step request's result (no sampling): logits [V] after its last token, and the
    # state after it (batch of 1), for the caller to keep (server-held sequence state).
    logits: np.ndarray | None = None
    state: dict[str, np.ndarray] | None = None
    # A beam search's result, on its last delta: `serving.engine.beam.Beam`s, best first.
    beams: list | None = None

    def extend(self, pieces: list[str], tokens: list[int], logprobs: list) -> None:
        """Append parts the same stream produced after these (an engine process's)."""
        self.pieces += pieces
        self.tokens += tokens
        self.logprobs += logprobs

    def merge(self, later: Delta) -> None:
        """Add `later` (what the same stream produced after this one) to this delta: its
        parts appended, its end and results taken (deltas from an engine process)."""
        self.extend(later.pieces, later.tokens, later.logprobs)
        if later.finished:
            for name in _RESULTS:
                setattr(self, name, getattr(later, name))


_RESULTS = (  # what a stream's last delta carries besides its parts
    "finished", "finish_reason", "error", "prompt_tokens", "completion_tokens", "seed",
    "queue_time_us", "time_to_first_token_us", "logits", "state", "beams",
)  # fmt: skip


class Shippable:
    """A job that can be sent to an engine process (`serving.remote`): pickled without
    its outbox, which stays with the transport; the copy gets a fresh one."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["outbox"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.outbox = Outbox()


class Waker:
    """How an outbox wakes a reader on an event loop: `event.set()` on `loop` (an asyncio
    loop, or anything with its `call_soon_threadsafe`: an engine process's connection to
    its frontend, `serving.remote.host`), from any thread. Called at once, or, when
    `batch` is set and inside `batched_wakes()`, with every other such waker of the same
    loop in one call into that loop."""

    __slots__ = ("loop", "event", "batch")

    def __init__(self, loop, event, batch: bool = False):
        self.loop, self.event, self.batch = loop, event, batch

    def __call__(self) -> None:
        _wake(self.loop, [self.event])


def _wake(loop, events: list) -> None:
    if asyncio._get_running_loop() is loop:  # on the loop's own thread (an engine
        _set_all(events)  # process's deltas arrive there): no hop through its self-pipe
        return
    try:
        loop.call_soon_threadsafe(_set_all, events)
    except RuntimeError:  # the loop is closed: its readers are gone
        pass


def _set_all(events: list) -> None:
    for event in events:
        event.set()


_batch = threading.local()


@contextlib.contextmanager
def batched_wakes():
    """Within it (one engine iteration, on the engine's thread), the outboxes that turn
    ready wake their readers together when it ends: one call into each event loop per
    iteration, not one per stream."""
    pending: list[Waker] = []
    _batch.pending = pending
    try:
        yield
    finally:
        _batch.pending = None
        by_loop: dict = {}
        for waker in pending:
            by_loop.setdefault(waker.loop, []).append(waker.event)
        for loop, events in by_loop.items():
            _wake(loop, events)


class Outbox:
    """Where the scheduler leaves a stream's output and the transport takes it: every
    `take` returns all that accumulated since the previous one, so a client that reads
    slower than tokens arrive gets several per message, never a token held back."""

    def __init__(self):
        self._cond = threading.Condition()
        self._delta = Delta()
        self._ready = False
        self._done = False
        self._armed = False  # a consumer found nothing and waits for `on_ready`
        self._armed_end = False  # a consumer holds what is there until the end comes
        self.ready_since = 0.0  # time.monotonic() of the oldest put not yet taken
        self.on_ready: Callable[[], None] | None = None  # called outside the lock

    def put(self, update: Callable[[Delta], None], since: float | None = None) -> None:
        """Apply `update` to what accumulated; `since`: when it was produced (an engine
        process's time.monotonic(), the same clock), else now."""
        with self._cond:
            if self._done:
                return
            update(self._delta)
            if not self._ready:
                self._ready = True
                self.ready_since = time.monotonic() if since is None else since
            self._done = self._delta.finished
            self._cond.notify_all()
            wake = self._armed or (self._armed_end and self._done)
            if wake:
                self._armed = self._armed_end = False
        if wake and self.on_ready is not None:  # once per wait, not once per token
            pending = getattr(_batch, "pending", None)
            if pending is not None and getattr(self.on_ready, "batch", False):
                pending.append(self.on_ready)  # with the iteration's other wake-ups
            else:
                self.on_ready()

    def ready_or_arm(self, end_only: bool = False) -> bool:
        """Whether there is something to take (with `end_only`: whether the stream's end
        is there), else False having armed `on_ready` for the next put (for the end,
        with `end_only`): a consumer that waits before it takes."""
        with self._cond:
            if end_only:
                self._armed_end = not self._done
                return self._done
            if not self._ready:
                self._armed = True
            return self._ready

    def take_or_arm(self) -> Delta | None:
        """The accumulated delta, or None having armed `on_ready` for the next put (an
        event loop's consumer: one wake-up per wait, however many tokens arrive)."""
        with self._cond:
            if not self._ready:
                self._armed = True
                return None
            delta, self._delta, self._ready = self._delta, Delta(), False
            self._armed_end = False
            return delta

    def take(self, timeout: float | None = None) -> Delta | None:
        """The accumulated delta, waiting up to `timeout` for one; None if nothing came."""
        with self._cond:
            if not self._ready and not self._cond.wait_for(lambda: self._ready, timeout):
                return None
            delta, self._delta, self._ready = self._delta, Delta(), False
            return delta


@dataclass(eq=False)
class Sequence(Shippable):
    """One generation: a prompt (or a captioner's <start>) to feed, then one sampled
    token per iteration until EOS, a stop string, max_tokens, cancellation or a deadline.
    Without a sampler, a step request: its tokens are fed (in the same batch as the
    generations) and it ends with the logits and the state after the last one."""

    pending: np.ndarray  # int64 tokens still to feed: the prompt, then each sampled token
    sampler: Sampler | None  # None: a step request, which returns logits and state
    max_tokens: int
    output: Output
    state: dict[str, np.ndarray] | None = None  # batch of 1; None: the model's zero state
    deadline: float | None = None  # time.monotonic() after which the stream is dropped
    # Coalesced streaming, for an engine process (serving.remote.host): how long its
    # deltas may wait there to share a message; its reader here holds them the same.
    interval_s: float = 0.0
    id: int = field(default_factory=next_id)
    status: Status = Status.WAITING
    prompt_tokens: int = 0
    submitted: float = field(default_factory=time.monotonic)
    joined: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0  # when its latest token was sampled
    outbox: Outbox = field(default_factory=Outbox)
    cancelled: bool = False  # set by the transport; the scheduler drops it next iteration
    rows: ClassVar[int] = 1  # state rows it runs in the batch (a beam search has several)
    max_rows: ClassVar[int] = 1  # the most it will hold: what a join reserves

    @property
    def feeds_by_step(self) -> bool:
        """Whether its next input goes through the step graph even where a prefill graph
        exists: a sampled token, or a step request's single token (so client-driven
        sequences share the decode batch)."""
        return self.status is Status.RUNNING or (self.sampler is None and len(self.pending) == 1)

    def finish(self, reason: str, error: Exception | None = None) -> None:
        self.status = Status.FINISHED
        tail = self.output.flush() if reason in ("length", "eos") else ""
        joined = self.joined or time.monotonic()

        def close(d: Delta) -> None:
            if tail:
                d.pieces.append(tail)
            d.finished, d.finish_reason, d.error = True, reason, error
            d.prompt_tokens = self.prompt_tokens
            if self.sampler is not None:
                d.completion_tokens = self.sampler.produced
                d.seed = self.sampler.seed
            d.queue_time_us = int((joined - self.submitted) * 1e6)
            if self.first_token:
                d.time_to_first_token_us = int((self.first_token - self.submitted) * 1e6)

        self.outbox.put(close)
