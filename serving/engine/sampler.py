"""Choosing the next token from logits, for a whole batch at once: greedy, temperature,
top-k, top-p (nucleus), repetition penalty, minimum length, log-probabilities.

`sample_rows(logits [R, V], rows)` applies each row's own parameters and draws from
each row's own generator. Every step works row by row (element-wise arithmetic, a max,
a stable sort, a running sum, never a pairwise `sum` whose grouping could depend on the
array's shape), so a row's token depends on its logits, parameters and generator only:
the same seed gives byte-identical text alone or inside any batch.

Seeded sampling is reproducible: the same seed, logits and parameters give the same
tokens on any machine (numpy's PCG64 and one uniform draw per sampled token).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None  # None: a fresh random seed
    # > 1 discourages every token already in the prompt or the output (CTRL's rule:
    # a positive logit is divided by it, a negative one multiplied); 1 disables.
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS cannot be sampled before this many tokens
    logprobs: int = -1  # -1: none; n >= 0: the chosen token's and the n most likely


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


class Sampler:
    """One sequence's sampling state: its parameters, seed and random generator, and
    which tokens it has seen (for the repetition penalty)."""

    def __init__(self, params: SamplingParams, vocab_size: int = 0):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.seen = np.zeros(vocab_size, bool) if params.repetition_penalty != 1 else None
        self.produced = 0
        p = params
        self.knobs = (p.temperature, p.top_k, p.top_p, p.repetition_penalty)
        self.greedy = p.temperature == 0

    def see(self, tokens) -> None:
        if self.seen is not None:
            self.seen[np.asarray(tokens, np.int64)] = True

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution actually sampled from: [V] float64 summing to 1."""
        return distributions(logits[None], [self])[0]

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V] -> one token id (and the token counts as seen and produced)."""
        return int(sample_rows(logits[None], [self])[0][0])


def _row_totals(x: np.ndarray) -> np.ndarray:
    """Per-row sums [R, 1] by a running sum: the same bits whatever R is."""
    return np.cumsum(x, axis=1)[:, -1:]


def distributions(
    logits: np.ndarray, rows: list[Sampler], banned: np.ndarray | None = None
) -> np.ndarray:
    """logits: [R, V] -> the distributions sampled from, [R, V] float64, one row per
    sampler. `banned` [R, V] bool marks tokens a row may not take now."""
    return _distributions(logits, rows, _knobs(rows), banned)


def _knobs(rows: list[Sampler]) -> np.ndarray:
    """[4, R]: each row's temperature, top-k, top-p and repetition penalty (one array
    built in one call: numpy's per-call cost is what a small batch pays)."""
    return np.array([r.knobs for r in rows]).T


def _distributions(
    logits: np.ndarray, rows: list[Sampler], knobs: np.ndarray, banned: np.ndarray | None
) -> np.ndarray:
    temperature, top_k, top_p, penalty = knobs
    z = logits.astype(np.float64)
    if banned is not None:
        z = np.where(banned, -np.inf, z)
    if (penalty != 1).any():
        for i, r in enumerate(rows):
            if r.seen is not None and penalty[i] != 1:
                hit = r.seen & np.isfinite(z[i])
                z[i, hit] = np.where(z[i, hit] > 0, z[i, hit] / penalty[i], z[i, hit] * penalty[i])
    greedy = temperature == 0
    z -= z.max(axis=1, keepdims=True)  # shift first: a tiny temperature gives -inf, not NaN
    # Each row's maximum is now exactly 0, and stays 0 through the division and top-k
    # (which keeps rank 0): the exponent needs no second shift.
    z /= np.where(greedy, 1.0, temperature)[:, None]
    sparse_k, nucleus = (top_k > 0).any(), (top_p < 1).any()
    if sparse_k or nucleus:
        # Ranks by a stable sort: exactly k candidates, ties at the k-th go to the lower id.
        order = np.argsort(-z, axis=1, kind="stable")
    if sparse_k:
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(z.shape[1])[None], axis=1)
        z = np.where((top_k[:, None] > 0) & (rank >= top_k[:, None]), -np.inf, z)
    probs = np.exp(z)
    probs /= _row_totals(probs)
    if nucleus:
        sorted_probs = np.take_along_axis(probs, order, axis=1)
        cumulative = np.cumsum(sorted_probs, axis=1)
        keep_n = (cumulative < top_p[:, None]).sum(axis=1) + 1  # the smallest nucleus
        keep_sorted = np.arange(z.shape[1])[None] < np.where(top_p < 1, keep_n, z.shape[1])[:, None]
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        probs = np.where(keep, probs, 0.0)
        probs /= _row_totals(probs)
    if greedy.any():
        one_hot = np.zeros_like(probs)
        one_hot[np.arange(len(rows)), np.argmax(z, axis=1)] = 1.0  # the first maximum
        probs = np.where(greedy[:, None], one_hot, probs)
    return probs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[R, V] -> log-probabilities [R, V] float64, row by row (batch-invariant)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(_row_totals(np.exp(z)))


def sample_rows(
    logits: np.ndarray, rows: list[Sampler], eos: int | None = None
) -> tuple[np.ndarray, list[TokenLogprob | None]]:
    """logits: [R, V] -> (tokens [R], log-probabilities per row or None).

    Each row draws from its own generator (one uniform per non-greedy token); a row
    with fewer than `min_tokens` produced cannot take `eos`.
    """
    banned = None
    if eos is not None and any(r.produced < r.params.min_tokens for r in rows):
        banned = np.zeros(logits.shape, bool)
        for i, r in enumerate(rows):
            banned[i, eos] = r.produced < r.params.min_tokens
    knobs = _knobs(rows)
    probs = _distributions(logits, rows, knobs, banned)
    cdf = np.cumsum(probs, axis=1)
    greedy = knobs[0] == 0
    u = np.array([0.0 if r.greedy else r._rng.random() for r in rows])
    # The first index whose running sum exceeds u * total (searchsorted, side="right").
    tokens = np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1), cdf.shape[1] - 1)
    if greedy.any():
        tokens = np.where(greedy, np.argmax(probs, axis=1), tokens)
    tokens = tokens.astype(np.int64)
    for r, token in zip(rows, tokens.tolist(), strict=True):
        r.produced += 1
        if r.seen is not None:
            r.seen[token] = True
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs >= 0]
    if wanted:
        lp = log_softmax(logits[wanted])  # the model's own distribution, before sampling knobs
        for j, i in enumerate(wanted):
            n = rows[i].params.logprobs
            best = np.argsort(-lp[j], kind="stable")[:n]
            logprobs[i] = TokenLogprob(
                int(tokens[i]),
                float(lp[j, tokens[i]]),
                tuple((int(t), float(lp[j, t])) for t in best),
            )
    return tokens, logprobs


class StopMatcher:
    """Holds back text that could still become a stop string.

    `push(text)` returns (text safe to send now, whether a stop string was hit).
    Text from a stop string onwards is never sent.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
