"""Samplers and stop strings, directly, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine.sampler import Sampler, SamplingParams, StopMatcher

LOGITS = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))


def draws(params: SamplingParams, n: int = 4000) -> np.ndarray:
    sampler = Sampler(params)
    return np.bincount([sampler(LOGITS) for _ in range(n)], minlength=LOGITS.size) / n


def test_greedy_is_argmax():
    assert {Sampler(SamplingParams(temperature=0))(LOGITS) for _ in range(20)} == {1}


def test_temperature_one_samples_the_softmax():
    np.testing.assert_allclose(draws(SamplingParams(seed=0)), np.exp(LOGITS), atol=0.03)


def test_low_temperature_sharpens():
    assert draws(SamplingParams(temperature=0.2, seed=0))[1] > 0.75


def test_top_k_keeps_only_the_k_most_probable():
    freq = draws(SamplingParams(top_k=2, seed=0))
    assert freq[[0, 3, 4]].sum() == 0
    np.testing.assert_allclose(freq[[1, 2]], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)


def test_top_k_keeps_exactly_k_when_logits_tie():
    tied = np.log(np.array([0.1, 0.3, 0.3, 0.3]))
    probs = Sampler(SamplingParams(top_k=2)).probabilities(tied)
    np.testing.assert_allclose(probs, [0, 0.5, 0.5, 0], atol=1e-9)  # lower ids win ties


def test_top_p_keeps_the_smallest_nucleus():
    probs = Sampler(SamplingParams(top_p=0.8)).probabilities(LOGITS)
    # 0.4 + 0.3 = 0.7 < 0.8, so the nucleus needs the 0.15 token too
    np.testing.assert_allclose(probs, [0, 0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0], atol=1e-9)


def test_same_seed_same_tokens():
    a, b, c = (Sampler(SamplingParams(seed=s)) for s in (5, 5, 6))
    seq = [[s(LOGITS) for _ in range(50)] for s in (a, b, c)]
    assert seq[0] == seq[1] != seq[2]


@pytest.mark.parametrize(
    "pieces,stops,sent,stopped",
    [
        (list("hello world"), ["wor"], "hello ", True),
        (list("abcabd"), ["abd"], "abc", True),  # a false start is released later
        (list("ab"), ["abc"], "", False),  # held back while it could still match
        (["xEN", "Dy"], ["END"], "x", True),
        (list("plain"), [], "plain", False),
    ],
)
def test_stop_matcher(pieces, stops, sent, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.push(p)
        out += text
        if hit:
            break
    assert (out, hit) == (sent, stopped)
    if not stopped:
        assert out + m.flush() == "".join(pieces)
