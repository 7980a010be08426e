"""The former beam search, a generator running the beams as a batch of their own (the
server's path until beams became a job of the engine): the reference
`serving.engine.beam.BeamSearch` is tested against, word for word and beam for beam."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from serving.engine.beam import Beam, _common_prefix
from serving.engine.sampler import log_softmax
from serving.errors import NonFiniteOutput


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


def run_beams(core, jobs) -> list[list]:
    """Step `core` (jobs submitted) to the end, taking each job's delta after every
    iteration: per job, the deltas it produced."""
    got = [[] for _ in jobs]
    while core.has_work():
        core.step()
        for deltas, job in zip(got, jobs, strict=True):
            if (delta := job.outbox.take(timeout=0)) is not None:
                deltas.append(delta)
    return got
