"""Greedy decoding one step at a time, the way a client drives a step graph itself.
numpy only: tests/triton_driver.py imports it in a process that must not load
stepwise's protobuf stubs."""

from __future__ import annotations

import numpy as np

EOS = 0  # <eos>: also what opens a document


def greedy(step, vocab: list[str], prompt: str, n: int) -> str:
    """<eos> and the prompt, then each argmax token fed back, until <eos> or n
    characters; `step(token) -> logits [V]` runs one token through the model."""
    feed, got = [EOS, *(vocab.index(ch) for ch in prompt)], ""
    while len(got) < n:
        for token in feed:
            logits = step(token)
        token = int(np.argmax(logits))
        if token == EOS:
            break
        got, feed = got + vocab[token], [token]
    return got


def opening(step):
    """`step(token, start)` as `step(token)`, with start true on the first call only (a
    server-held sequence's first step opens it)."""
    calls = iter((True,))
    return lambda token: step(token, next(calls, False))
