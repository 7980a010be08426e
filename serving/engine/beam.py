"""Beam search for captions, length-normalized.

The `beam_size` best partial captions advance together, one row each of the decoder's
step graph; each candidate's score is its summed log-probability, and finished
captions (those that sampled <end>) are ranked by their mean log-probability per token,
<end> included, so short captions are not favoured merely for being short. The search
ends once `beam_size` captions have finished (early stopping, as Hugging Face's
`early_stopping=True`) or at `max_length`, where unfinished beams count too.

Words are streamed once they are decided: when every live beam and every finished
caption kept so far begin with the same words, those words can no longer change.

`BeamSearch` is a job of the engine: its rows step in the model's continuous batch
with every other stream (`serving.engine.beam_request` builds one). The former path,
a generator running the beams as a batch of their own, is now tests/beam_reference.py,
the reference the job is tested against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from serving.engine.request import Delta, Outbox, Shippable, Status, next_id
from serving.engine.sampler import log_softmax
from serving.errors import NonFiniteOutput


@dataclass(frozen=True)
class Beam:
    words: tuple[str, ...]
    logprob: float  # summed over its tokens
    tokens: int  # tokens produced, <end> included when finished
    finished: bool  # ended with <end> (else: cut at max_length)

    @property
    def score(self) -> float:
        return self.logprob / max(self.tokens, 1)


class BeamSearch(Shippable):
    """A beam search as one job of the engine: while it runs, each live beam is a row of
    the decode batch (up to `beam_size`, the rows its join reserves). `pending` holds
    each beam's last token, fed as [k, 1]; `advance` takes the k rows' logits and says
    which state rows the next beams continue from. Its deltas carry decided words in
    `pieces`; the last one the ranked beams in `beams`."""

    feeds_by_step = True  # <start>, then one token per beam: never a prefill chunk

    def __init__(self, model, state: dict | None, beam_size: int, max_length: int):
        self.vocab, self.eos, self.never_sampled = model.vocab, model.eos, model.never_sampled
        self.name, self.max_rows, self.max_length = model.name, beam_size, max_length
        self.state = state  # the decoder's state, one row per live beam (batch axis)
        self.pending = np.asarray([model.bos], np.int64)  # [k]: each live beam's last token
        self.live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (ids, summed logprob)
        self.done: list[Beam] = []  # finished captions, best first
        self.sent = 0  # words of the best caption already delivered
        self.steps = 0
        self.beams: list[Beam] | None = None  # the result, best first, once finished
        self.tail: list[str] = []  # the best caption's words not yet delivered, at the end
        self.deadline: float | None = None  # time.monotonic() after which it is dropped
        self.interval_s = 0.0  # coalesced streaming in an engine process (Sequence's)
        self.id = next_id()
        self.status = Status.WAITING
        self.submitted = time.monotonic()
        self.joined = 0.0
        self.first_token = 0.0  # when its first word was decided (or it ended without)
        self.last_token = 0.0  # when its latest step's tokens came
        self.outbox = Outbox()
        self.cancelled = False

    @property
    def rows(self) -> int:
        return len(self.pending)

    def advance(self, logits: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
        """logits: [k, V] after each live beam's last token -> (the state rows the new
        beams continue from [k'], or None once the search has ended and `beams` holds
        the result; the words newly decided, which `finish` delivers with the beams once
        it has ended). The next tokens are left in `pending`."""
        if not np.all(np.isfinite(logits)):
            raise NonFiniteOutput(f"{self.name} produced non-finite logits")
        k, vocab = self.max_rows, self.vocab
        logp = log_softmax(logits)  # [k, V]
        logp[:, self.never_sampled] = -np.inf
        totals = np.asarray([s for _, s in self.live])[:, None] + logp  # [k, V]
        order = np.argsort(-totals, axis=None, kind="stable")[: 2 * k]
        survivors, rows = [], []
        for flat in order:
            row, token = divmod(int(flat), logp.shape[1])
            ids, total = self.live[row][0] + (token,), float(totals[row, token])
            if not np.isfinite(total):
                continue
            if token == self.eos:
                self.done.append(Beam(tuple(vocab[t] for t in ids[:-1]), total, len(ids), True))
            elif len(survivors) < k:
                survivors.append((ids, total))
                rows.append(row)
        self.done = sorted(self.done, key=_best)[:k]
        self.steps += 1
        last_step = self.steps == self.max_length
        if not survivors or last_step or len(self.done) >= k:
            cut = [Beam(tuple(vocab[t] for t in ids), s, len(ids), False) for ids, s in survivors]
            beams = sorted(self.done + (cut if last_step or not self.done else []), key=_best)
            self.beams = beams[:k]
            best = list(self.beams[0].words) if self.beams else []
            self.tail = best[self.sent :]  # `finish` delivers them with the beams
            return None, self.tail
        self.live = survivors
        self.pending = np.asarray([ids[-1] for ids, _ in survivors], np.int64)
        decided = _common_prefix([ids for ids, _ in survivors], [b.words for b in self.done], vocab)
        words, self.sent = decided[self.sent :], max(self.sent, len(decided))
        return np.asarray(rows), words

    def finish(self, reason: str, error: Exception | None = None) -> None:
        self.status = Status.FINISHED
        best = self.beams[0] if self.beams else None
        end = time.monotonic()
        joined, first = self.joined or end, self.first_token or end

        def close(d: Delta) -> None:
            d.pieces.extend(self.tail)
            d.finished, d.finish_reason, d.error = True, reason, error
            d.beams = self.beams
            d.completion_tokens = best.tokens if best else 0
            d.queue_time_us = int((joined - self.submitted) * 1e6)
            d.time_to_first_token_us = int((first - self.submitted) * 1e6)

        self.outbox.put(close)


def _best(beam: Beam) -> float:
    return -beam.score


def _common_prefix(live: list[tuple[int, ...]], finished: list[tuple[str, ...]], vocab) -> list:
    candidates = [[vocab[t] for t in ids] for ids in live] + [list(w) for w in finished]
    prefix = []
    for words in zip(*candidates, strict=False):
        if any(w != words[0] for w in words):
            break
        prefix.append(words[0])
    return prefix
