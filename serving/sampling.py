"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

Seeded sampling is reproducible: the same seed, logits and parameters give the
same tokens on any machine (numpy's PCG64 and one uniform draw per token).
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


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution actually sampled from: [V] float64 summing to 1."""
        p = self.params
        z = logits.astype(np.float64)
        if p.temperature == 0:
            probs = np.zeros_like(z)
            probs[int(np.argmax(z))] = 1.0
            return probs
        z = (z - z.max()) / p.temperature  # shift first: a tiny temperature gives -inf, not NaN
        if 0 < p.top_k < z.size:
            # Exactly k candidates: ties at the k-th logit go to the lower token id.
            keep = np.argsort(-z, kind="stable")[: p.top_k]
            kept = np.full_like(z, -np.inf)
            kept[keep] = z[keep]
            z = kept
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return probs

    def __call__(self, logits: np.ndarray) -> int:
        """logits: [V] -> one token id."""
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        cdf = np.cumsum(self.probabilities(logits))
        return int(
            min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), cdf.size - 1)
        )


class StopMatcher:
    """Holds back text that could still become a stop string.

    `push(text)` returns (text safe to send now, whether a stop string was hit).
    Text from a stop string onwards is never sent.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
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
