"""Caption quality: corpus BLEU-4 and object recall, written out (no extra dependency)."""

from __future__ import annotations

import math
from collections import Counter

from training.data.scenes import COLOURS, SHAPES


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(references: list[list[str]], hypotheses: list[list[str]], n: int = 4) -> float:
    """Papineni et al.'s corpus BLEU with one reference per hypothesis, uniform weights."""
    matched, total = [0] * n, [0] * n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_len, hyp_len = ref_len + len(ref), hyp_len + len(hyp)
        for k in range(1, n + 1):
            hyp_grams = _ngrams(hyp, k)
            matched[k - 1] += sum((hyp_grams & _ngrams(ref, k)).values())
            total[k - 1] += sum(hyp_grams.values())
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))
    return brevity * math.exp(log_precision)


def named_objects(words: list[str]) -> Counter:
    """The (colour, shape) pairs a caption names."""
    return Counter(
        (a, b) for a, b in zip(words, words[1:], strict=False) if a in COLOURS and b in SHAPES
    )


def object_recall(scenes_objects: list[Counter], hypotheses: list[list[str]]) -> float:
    """Of all shapes in all scenes, the fraction named with their correct colour."""
    found = sum(
        sum((objects & named_objects(hyp)).values())
        for objects, hyp in zip(scenes_objects, hypotheses, strict=True)
    )
    return found / max(1, sum(sum(o.values()) for o in scenes_objects))
