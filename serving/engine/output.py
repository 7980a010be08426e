"""Token ids -> client text, one sequence at a time (vLLM's output processor).

`push(token)` returns (text to send now, whether a stop string ended the sequence);
`flush()` returns what was held back once the sequence ends for another reason.
"""

from __future__ import annotations

from serving.engine.sampler import StopMatcher


class Output:
    joiner = ""  # how the pieces of several tokens join in one message

    def push(self, token: int) -> tuple[str, bool]:
        raise NotImplementedError

    def flush(self) -> str:
        return ""


class TextOutput(Output):
    """Characters, with stop strings held back until they can no longer match. Stop
    strings only start matching once `min_tokens` tokens have been produced."""

    def __init__(self, vocab: list[str], stops: list[str] = (), min_tokens: int = 0):
        self.vocab = vocab
        self.matcher = StopMatcher(list(stops))
        self.min_tokens = min_tokens
        self.produced = 0

    def push(self, token: int) -> tuple[str, bool]:
        self.produced += 1
        if self.produced <= self.min_tokens:
            return self.matcher.flush() + self.vocab[token], False
        return self.matcher.push(self.vocab[token])

    def flush(self) -> str:
        return self.matcher.flush()


class WordOutput(Output):
    """A captioner's words; the whole caption is kept for the last message."""

    joiner = " "

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.words: list[str] = []

    def push(self, token: int) -> tuple[str, bool]:
        self.words.append(self.vocab[token])
        return self.vocab[token], False
