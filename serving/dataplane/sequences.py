"""Server-held sequence state for KServe's sequence batcher (`sequence_id`,
`sequence_start`, `sequence_end`): the per-model store of each client's live
sequences, which `serving.dataplane.plane.DataPlane.step` steps through the model's
engine (`serving.api.kserve_codec.sequence_parameters` reads the ids a request names)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from serving.core.model_config import DEFAULT_SEQUENCE_IDLE_US
from serving.errors import InvalidArgument, ResourceExhausted

MAX_SEQUENCES = 1024  # live server-held sequences per model; past it RESOURCE_EXHAUSTED
EXPIRED_KEPT = 4096  # expired ids remembered, so a late call hears "expired"


def idle_us(model) -> int:
    idle = model.config.sequence_batching.max_sequence_idle_microseconds
    return idle or DEFAULT_SEQUENCE_IDLE_US


@dataclass
class _Entry:
    state: dict | None
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    version: str = ""  # the model version its state was computed by


class SequenceStore:
    """Server-held state by sequence id, for one model, used from the event loop only.
    Ids belong to the client that started them (`serving.api.clients`): another client's
    step on the same id finds no sequence, and can neither read nor end it. Idle
    sequences expire after `idle_us`; a client keeps at most `per_client` live, and
    the model at most MAX_SEQUENCES (a backstop for many clients)."""

    def __init__(self, idle_us: int, clock=time.monotonic, per_client: int = MAX_SEQUENCES):
        self.idle_s, self.clock, self.per_client = idle_us / 1e6, clock, per_client
        self.live: dict[tuple[str, str], _Entry] = {}  # (client, id) -> its state
        self.expired: dict[tuple[str, str], float] = {}
        self.held: Counter[str] = Counter()  # client -> its live sequences

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self.live.items() if now - e.last_used > self.idle_s]:
            if not self.live[key].lock.locked():
                self.end(key)
                self.expired[key] = now
        while len(self.expired) > EXPIRED_KEPT:
            self.expired.pop(next(iter(self.expired)))

    @contextlib.asynccontextmanager
    async def hold(self, client: str, sequence: str, start: bool):
        now, key = self.clock(), (client, sequence)
        self._sweep(now)
        entry = self.live.get(key)
        if start:
            if entry is not None:
                raise InvalidArgument(
                    "parameters.sequence_start", f"sequence {sequence} is already in use"
                )
            if self.held[client] >= self.per_client:
                raise ResourceExhausted(
                    f"parameters.sequence_start: this client already holds {self.held[client]} "
                    "live sequences on this model, the most one client may "
                    "(--max-sequences-per-client); end one (sequence_end) first"
                )
            if len(self.live) >= MAX_SEQUENCES:
                raise ResourceExhausted(f"{MAX_SEQUENCES} sequences are live; end one first")
            entry = self.live[key] = _Entry(None, now)
            self.held[client] += 1
            self.expired.pop(key, None)
        elif entry is None:
            if key in self.expired:
                raise InvalidArgument(
                    "parameters.sequence_id",
                    f"sequence {sequence} expired after {self.idle_s:g} s idle; start it again",
                )
            raise InvalidArgument(
                "parameters.sequence_id",
                f"sequence {sequence} does not exist; send sequence_start with its first step",
            )
        async with entry.lock:  # one step of a sequence at a time, in arrival order
            if self.live.get(key) is not entry:  # ended, or its start failed, meanwhile
                raise InvalidArgument(
                    "parameters.sequence_id", f"sequence {sequence} ended while this step waited"
                )
            try:
                yield entry
            except BaseException:
                if start:  # a first step that failed never started the sequence
                    self.end(key)
                raise
            entry.last_used = self.clock()

    def end(self, key: tuple[str, str]) -> None:
        if self.live.pop(key, None) is not None:
            client = key[0]
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]
