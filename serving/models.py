"""Model runtimes built from a model directory alone: the graphs plus `model.json`.

Nothing here knows gRPC: inputs are bytes, strings and numpy arrays; problems are
`serving.errors` exceptions.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.errors import DeviceError, InvalidArgument, ModelLoadError, NonFiniteOutput, preview
from serving.runtime import SessionFactory
from serving.sampling import Sampler, SamplingParams, StopMatcher

MODEL_CARD = "model.json"
log = logging.getLogger(__name__)


class Model:
    """What every served model has: a name, a version, a card and a provider."""

    kind = ""

    def __init__(self, directory: Path, card: dict):
        self.directory = directory
        self.card = card
        self.name = card["name"]
        self.version = directory.name  # the repository layout decides, as in Triton
        self.provider = ""
        self.metrics = _read_metrics(directory / "metrics.json")

    def _session(self, graph: str, sessions: SessionFactory):
        session = sessions(self.directory / self.card["graphs"][graph])
        self.provider = session.get_providers()[0]
        return session


def _read_metrics(path: Path) -> dict:
    """Training figures shown by ListModels; read once, and optional."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


class Classifier(Model):
    kind = "classifier"

    def __init__(self, directory: Path, card: dict, sessions: SessionFactory):
        super().__init__(directory, card)
        self.session = self._session("model", sessions)
        self.labels: list[str] = card["labels"]
        self.input = card["inputs"][0]
        self.preprocess = card["preprocess"]

    def check_tensor(self, array: np.ndarray, field: str = "tensor") -> np.ndarray:
        """Accept [C, H, W] or [1, C, H, W] float32 matching the model input."""
        want = tuple(self.input["shape"][1:])
        if array.shape not in (want, (1, *want)):
            raise InvalidArgument(
                f"{field}.shape", f"got {list(array.shape)}; allowed {list(want)} or {[1, *want]}"
            )
        if not np.all(np.isfinite(array)):
            raise InvalidArgument(f"{field}.raw_data", "holds NaN or infinite values")
        return array.reshape(want)

    def rows(self, x: np.ndarray) -> list:
        """x: [B, C, H, W] -> for each row its probabilities [K], or NonFiniteOutput for a
        row the graph overflowed on (that row alone fails; the dynamic batcher's form)."""
        (logits,) = self.session.run(["logits"], {self.input["name"]: x})
        finite = np.all(np.isfinite(logits), axis=1)
        z = np.where(finite[:, None], logits, 0)
        z = z - z.max(axis=1, keepdims=True)  # stable: every exponent <= 0
        e = np.exp(z)
        probs = e / e.sum(axis=1, keepdims=True)
        if finite.all():
            return list(probs)
        error = NonFiniteOutput(f"{self.name} produced non-finite logits")
        return [p if ok else error for p, ok in zip(probs, finite, strict=True)]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """x: [B, C, H, W] -> softmax probabilities [B, K]; NonFiniteOutput when the graph
        overflows on any row (finite inputs far outside the trained range can do that)."""
        rows = self.rows(x)
        for row in rows:
            if isinstance(row, NonFiniteOutput):
                raise row
        return np.stack(rows)


@dataclass
class GenerationEvent:
    text: str
    finish_reason: str = ""  # set on the last event: "length", "stop" or "eos"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int = 0


class StepDecoder(Model):
    """A model run one token at a time through a step graph with explicit state."""

    def __init__(self, directory: Path, card: dict, sessions: SessionFactory):
        super().__init__(directory, card)
        self.step = self._session("step", sessions)
        self.vocab: list[str] = card["vocab"]
        self.eos = card["special_tokens"]["eos"]
        self.bos = card["special_tokens"].get("bos", self.eos)
        self.state = card["state"]  # [{input, output, dtype, shape}] fed back each step
        self.steps_run = itertools.count()  # graph runs, for tests and metrics
        # A start token of its own (the captioner's <start>) only ever opens a sequence.
        self.never_sampled = [self.bos] if self.bos != self.eos else []

    def _run(self, session, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        next(self.steps_run)
        names = ["logits", *(s["output"] for s in self.state)]
        logits, *new = session.run(names, {"tokens": tokens, **state})
        return logits, {s["input"]: v for s, v in zip(self.state, new, strict=True)}

    def _decode(
        self,
        logits: np.ndarray,
        state: dict,
        sampler: Sampler,
        max_tokens: int,
        is_active: Callable[[], bool],
    ) -> Iterator[int]:
        """Sample up to max_tokens tokens, EOS included, running the step graph between.

        Stops before sampling once `is_active()` turns false (a cancelled stream).
        """
        for produced in range(1, max_tokens + 1):
            if not is_active():
                return
            scores = logits[0]
            if not np.all(np.isfinite(scores)):
                raise NonFiniteOutput(f"{self.name} produced non-finite logits")
            if self.never_sampled:
                scores = scores.copy()
                scores[self.never_sampled] = -np.inf
            token = sampler(scores)
            yield token
            if token == self.eos:
                return
            if produced < max_tokens:
                logits, state = self._run(self.step, np.asarray([[token]], np.int64), state)


class LanguageModel(StepDecoder):
    kind = "language_model"
    prefill_chunk = 256  # prompt tokens per prefill run: bounds activations per stream

    def __init__(self, directory: Path, card: dict, sessions: SessionFactory):
        super().__init__(directory, card, sessions)
        self.prefill = self._session("prefill", sessions)
        self.index = {tok: i for i, tok in enumerate(self.vocab)}
        self._alphabet = "".join(t for i, t in enumerate(self.vocab) if i != self.eos)

    def encode(self, prompt: str, field: str = "prompt") -> list[int]:
        unknown = sorted({ch for ch in prompt if ch not in self.index})
        if unknown:
            raise InvalidArgument(
                field,
                f"characters {preview(unknown)} are not in the vocabulary of {self.name}; "
                f"allowed: {preview(self._alphabet, 100)}",
            )
        return [self.index[ch] for ch in prompt]

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        params: SamplingParams,
        stop: list[str] = (),
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[GenerationEvent]:
        """Yield one event per sampled token; the last carries finish_reason and counts.

        The prompt is consumed by the prefill graph (from zero state, after BOS) in
        chunks of `prefill_chunk` tokens, so a long prompt's activations never exist
        at once; then one step graph run per token.
        """
        ids = self.encode(prompt)
        sampler = Sampler(params)
        matcher = StopMatcher(list(stop))
        state = {
            s["input"]: np.zeros([1 if d == -1 else d for d in s["shape"]], s["dtype"])
            for s in self.state
        }
        tokens = np.asarray([[self.bos, *ids]], dtype=np.int64)  # [1, T]
        for start in range(0, tokens.shape[1], self.prefill_chunk):
            logits, state = self._run(
                self.prefill, tokens[:, start : start + self.prefill_chunk], state
            )
        finish, produced = "length", 0
        for token in self._decode(logits, state, sampler, max_tokens, is_active):
            produced += 1
            if token == self.eos:
                finish = "eos"
                break
            text, stopped = matcher.push(self.vocab[token])
            if text:
                yield GenerationEvent(text)
            if stopped:
                finish = "stop"
                break
        tail = "" if finish == "stop" else matcher.flush()
        yield GenerationEvent(tail, finish, len(ids), produced, sampler.seed)


@dataclass
class CaptionEvent:
    text: str  # the next word
    finish_reason: str = ""  # set on the last event: "eos" or "length"
    caption: str = ""  # set on the last event: every word
    completion_tokens: int = 0
    seed: int = 0


class Captioner(StepDecoder):
    """CNN encoder -> the decoder's initial state; the decoder's step graph -> words."""

    kind = "captioner"

    def __init__(self, directory: Path, card: dict, sessions: SessionFactory):
        super().__init__(directory, card, sessions)
        self.encoder = self._session("encoder", sessions)
        self.preprocess = card["preprocess"]  # what `serving.preprocess` makes of an image
        self.max_length = card["max_length"]
        self.image_input = card["encoder"]["inputs"][0]["name"]

    def initial_state(self, image: np.ndarray) -> dict:
        """image: [C, H, W], preprocessed as `self.preprocess` says -> the decoder state."""
        names = [s["input"] for s in self.state]
        outputs = self.encoder.run(names, {self.image_input: image[None]})
        return dict(zip(names, outputs, strict=True))

    def caption(
        self,
        image: np.ndarray,
        max_length: int,
        params: SamplingParams,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[CaptionEvent]:
        """Yield one event per word; the last carries finish_reason and the caption."""
        state = self.initial_state(image)
        sampler = Sampler(params)
        logits, state = self._run(self.step, np.asarray([[self.bos]], np.int64), state)
        words, finish, produced = [], "length", 0
        for token in self._decode(logits, state, sampler, max_length, is_active):
            produced += 1
            if token == self.eos:
                finish = "eos"
                break
            words.append(self.vocab[token])
            yield CaptionEvent(self.vocab[token])
        yield CaptionEvent("", finish, " ".join(words), produced, sampler.seed)


KINDS = {cls.kind: cls for cls in (Classifier, LanguageModel, Captioner)}


def load_model(directory: Path, sessions: SessionFactory | str) -> Model:
    """Build the runtime for one model version directory; `sessions` may be a device name."""
    if isinstance(sessions, str):
        sessions = SessionFactory(sessions)
    try:
        card = json.loads((directory / MODEL_CARD).read_text())
        cls = KINDS[card["kind"]]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{directory}: unreadable {MODEL_CARD} ({exc!r})") from exc
    try:
        return cls(directory, card, sessions)
    except DeviceError:
        raise  # the operator demanded a device we cannot give: not a per-model problem
    except Exception as exc:
        raise ModelLoadError(f"{directory}: {type(exc).__name__}: {exc}") from exc
