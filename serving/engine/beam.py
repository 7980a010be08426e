"""Beam search for captions, length-normalized.

The `beam_size` best partial captions advance together as one [k, 1] batch of the
decoder's step graph; each candidate's score is its summed log-probability, and
finished captions (those that sampled <end>) are ranked by their mean log-probability
per token, <end> included, so short captions are not favoured merely for being short.
The search ends once `beam_size` captions have finished (early stopping, as Hugging
Face's `early_stopping=True`) or at `max_length`, where unfinished beams count too.

Words are streamed once they are decided: when every live beam and every finished
caption kept so far begin with the same words, those words can no longer change.
The beams run as a batch of their own (not in the continuous batch of sampled
captions); ORT sessions are safe to share between threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

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


@dataclass
class BeamEvent:
    words: list[str]  # newly decided words
    beams: list[Beam] | None = None  # set on the last event: best first


def beam_search(
    model,
    state: dict[str, np.ndarray],
    beam_size: int,
    max_length: int,
    is_active: Callable[[], bool] = lambda: True,
) -> Iterator[BeamEvent]:
    """state: the decoder's initial state (batch 1). Yields decided words as they settle,
    then the final beams (at most `beam_size`, best first)."""
    vocab, eos = model.vocab, model.eos
    tokens = np.asarray([[model.bos]], np.int64)
    live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]  # (token ids, summed logprob)
    done: list[Beam] = []
    sent = 0
    for step in range(max_length):
        if not is_active():
            return
        logits, state = model.run("step", tokens, state)
        if not np.all(np.isfinite(logits)):
            raise NonFiniteOutput(f"{model.name} produced non-finite logits")
        logp = log_softmax(logits)  # [k, V]
        logp[:, model.never_sampled] = -np.inf
        totals = np.asarray([s for _, s in live])[:, None] + logp  # [k, V]
        order = np.argsort(-totals, axis=None, kind="stable")[: 2 * beam_size]
        survivors, rows = [], []
        for flat in order:
            row, token = divmod(int(flat), logp.shape[1])
            ids, total = live[row][0] + (token,), float(totals[row, token])
            if not np.isfinite(total):
                continue
            if token == eos:
                words = tuple(vocab[t] for t in ids[:-1])
                done.append(Beam(words, total, len(ids), True))
            elif len(survivors) < beam_size:
                survivors.append((ids, total))
                rows.append(row)
        done = sorted(done, key=lambda b: -b.score)[:beam_size]
        last_step = step == max_length - 1
        if not survivors or last_step or len(done) >= beam_size:
            cut = [Beam(tuple(vocab[t] for t in ids), s, len(ids), False) for ids, s in survivors]
            beams = sorted(done + (cut if last_step or not done else []), key=lambda b: -b.score)
            beams = beams[:beam_size]
            best = list(beams[0].words) if beams else []
            yield BeamEvent(best[sent:], beams)
            return
        live = survivors
        keep = np.asarray(rows)
        state = {name: np.take(v, keep, axis=model.state_axis[name]) for name, v in state.items()}
        tokens = np.asarray([[ids[-1]] for ids, _ in live], np.int64)
        decided = _common_prefix([ids for ids, _ in live], [b.words for b in done], vocab)
        if len(decided) > sent:
            yield BeamEvent(decided[sent:])
            sent = len(decided)


def _common_prefix(live: list[tuple[int, ...]], finished: list[tuple[str, ...]], vocab) -> list:
    candidates = [[vocab[t] for t in ids] for ids in live] + [list(w) for w in finished]
    prefix = []
    for words in zip(*candidates, strict=False):
        if any(w != words[0] for w in words):
            break
        prefix.append(words[0])
    return prefix
