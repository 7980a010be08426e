"""Model runtimes built from a model directory alone: the graphs plus `model.json`.

Nothing here knows gRPC: inputs are bytes, strings and numpy arrays; problems are
`serving.errors` exceptions. What a model is comes from its typed card
(`serving.core.card.ModelCard`), read once at load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.core.card import MODEL_CARD, CardError, ModelCard, Preprocess, StateSpec, TensorSpec
from serving.core.model_config import read_model_config
from serving.core.runtime import SessionFactory
from serving.errors import DeviceError, InvalidArgument, ModelLoadError, NonFiniteOutput, preview

log = logging.getLogger(__name__)


class Model:
    """What every served model has: a name, a version, a card and a provider."""

    kind = ""

    def __init__(self, directory: Path, card: ModelCard):
        self.directory = directory
        self.card = card
        # Triton's config.pbtxt beside the versions (defaults when absent): read once.
        self.config = read_model_config(directory.parent, card)
        self.name = card.name
        self.version = directory.name  # the repository layout decides, as in Triton
        self.provider = ""
        self.metrics = _read_metrics(directory / "metrics.json")

    def _session(self, graph: str, sessions: SessionFactory):
        # A published graph (`<model>_prefill`) runs as the graph it is.
        kind = self.card.graph_of.graph if self.card.graph_of else graph
        session = sessions(self.directory / self.card.graphs[graph], kind)
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

    def __init__(self, directory: Path, card: ModelCard, sessions: SessionFactory):
        super().__init__(directory, card)
        self.session = self._session("model", sessions)
        self.labels: list[str] = list(card.labels)
        self.input: TensorSpec = card.inputs[0]
        self.preprocess: Preprocess = card.preprocess

    def check_tensor(self, array: np.ndarray, field: str = "tensor") -> np.ndarray:
        """Accept [C, H, W] or [1, C, H, W] float32 matching the model input."""
        want = tuple(self.input.shape[1:])
        if array.shape not in (want, (1, *want)):
            raise InvalidArgument(
                f"{field}.shape", f"got {list(array.shape)}; allowed {list(want)} or {[1, *want]}"
            )
        if not np.all(np.isfinite(array)):
            raise InvalidArgument(f"{field}.raw_data", "holds NaN or infinite values")
        return array.reshape(want)

    def logit_rows(self, x: np.ndarray) -> list:
        """x: [B, C, H, W] -> for each row its logits [K], or NonFiniteOutput for a row
        the graph overflowed on (that row alone fails): what the dynamic batcher runs, for
        Classify and for KServe's ModelInfer alike."""
        (logits,) = self.session.run(["logits"], {self.input.name: x})
        error = NonFiniteOutput(f"{self.name} produced non-finite logits")
        return [row if np.all(np.isfinite(row)) else error for row in logits]

    @staticmethod
    def softmax(logits: np.ndarray) -> np.ndarray:
        """One row's probabilities; row by row, so a row's figures never depend on the
        batch it ran in."""
        e = np.exp(logits - logits.max())  # stable: every exponent <= 0
        return e / e.sum()

    def rows(self, x: np.ndarray) -> list:
        """x: [B, C, H, W] -> for each row its probabilities [K], or NonFiniteOutput."""
        return [
            row if isinstance(row, NonFiniteOutput) else self.softmax(row)
            for row in self.logit_rows(x)
        ]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """x: [B, C, H, W] -> softmax probabilities [B, K]; NonFiniteOutput when the graph
        overflows on any row (finite inputs far outside the trained range can do that)."""
        rows = self.rows(x)
        for row in rows:
            if isinstance(row, NonFiniteOutput):
                raise row
        return np.stack(rows)


class StepDecoder(Model):
    """A model run one token at a time through a step graph with explicit state.

    Stateless batched calls only: `run(graph, tokens [B, T], state) -> (logits [B, V],
    state)`. The decode loop, the batch and the sampling belong to `serving.engine`.
    """

    # Prompt tokens per prefill run. A recurrent prefill is sequential in time, so a chunk
    # costs about its length in steps: small chunks keep running streams flowing while
    # long prompts join (docs/BENCHMARKS.md), and bound activations per stream.
    prefill_chunk = 32

    def __init__(self, directory: Path, card: ModelCard, sessions: SessionFactory):
        super().__init__(directory, card)
        self.graphs = {"step": self._session("step", sessions)}
        self.vocab: list[str] = list(card.vocab)
        self.eos, self.bos = card.eos, card.start_token
        self.state: tuple[StateSpec, ...] = card.state  # fed back each step
        # The batch axis of each state tensor: the card's one dynamic (-1) dimension.
        self.state_axis = {s.input: s.batch_axis for s in self.state}
        # A start token of its own (the captioner's <start>) only ever opens a sequence.
        self.never_sampled = [self.bos] if self.bos != self.eos else []

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {s.input: np.zeros(s.zeros_shape(batch), s.dtype) for s in self.state}

    def run(self, graph: str, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        """tokens: [B, T] int64, state: batched -> (logits of the last position [B, V],
        the state after the last token)."""
        names = ["logits", *(s.output for s in self.state)]
        logits, *new = self.graphs[graph].run(names, {"tokens": tokens, **state})
        return logits, {s.input: v for s, v in zip(self.state, new, strict=True)}

    # The same run with the state kept on the model's device (ONNX Runtime I/O binding):
    # state goes in and comes out as OrtValues where the provider keeps them (GPU memory
    # on CUDA), so a batch stepping again feeds its last output straight back; only the
    # tokens go up and the logits come down. On the CPU provider the OrtValues are host
    # memory and the path is the same.

    @property
    def device_type(self) -> str:
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def to_device(self, array: np.ndarray) -> ort.OrtValue:
        """A copy of `array` on the model's device (never a view of the caller's array)."""
        return ort.OrtValue.ortvalue_from_numpy(np.array(array), self.device_type, 0)

    @staticmethod
    def to_host(value: ort.OrtValue) -> np.ndarray:
        return np.array(value.numpy())  # a copy: numpy() views the OrtValue's memory

    def run_bound(self, graph: str, tokens: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        """As `run`, with `state` a dict of OrtValues on the device, and the new state
        returned as OrtValues left on the device."""
        session = self.graphs[graph]
        binding = session.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens))
        for s in self.state:
            binding.bind_ortvalue_input(s.input, state[s.input])
        binding.bind_output("logits", "cpu")
        for s in self.state:
            binding.bind_output(s.output, self.device_type, 0)
        session.run_with_iobinding(binding)
        logits, *new = binding.get_outputs()
        state = {s.input: v for s, v in zip(self.state, new, strict=True)}
        return self.to_host(logits), state


class LanguageModel(StepDecoder):
    kind = "language_model"

    def __init__(self, directory: Path, card: ModelCard, sessions: SessionFactory):
        super().__init__(directory, card, sessions)
        self.graphs["prefill"] = self._session("prefill", sessions)
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


class Captioner(StepDecoder):
    """CNN encoder -> the decoder's initial state; the decoder's step graph -> words."""

    kind = "captioner"

    def __init__(self, directory: Path, card: ModelCard, sessions: SessionFactory):
        super().__init__(directory, card, sessions)
        self.encoder = self._session("encoder", sessions)
        self.preprocess = card.preprocess  # what `serving.core.preprocess` makes of an image
        self.max_length = card.max_length
        self.image_input = card.encoder.inputs[0].name

    def initial_state(self, image: np.ndarray) -> dict:
        """image: [C, H, W], preprocessed as `self.preprocess` says -> the decoder state."""
        names = [s.input for s in self.state]
        outputs = self.encoder.run(names, {self.image_input: image[None]})
        return dict(zip(names, outputs, strict=True))


class Graph(Model):
    """One graph of another model published on its own (`<model>_<graph>`: a language
    model's prefill, the captioner's encoder), served as plain tensors in and out."""

    kind = "graph"

    def __init__(self, directory: Path, card: ModelCard, sessions: SessionFactory):
        super().__init__(directory, card)
        self.session = self._session("model", sessions)
        # The card of the model this graph belongs to (its vocabulary and state, which
        # bound what a request may feed the graph), or None when it cannot be read.
        self.of = _parent_card(directory, card)


def _parent_card(directory: Path, card: ModelCard) -> ModelCard | None:
    """The card of `<repository>/<model>/<same version>/`, for a graph published as
    `<model>_<graph>` (export writes both versions together)."""
    if card.graph_of is None:
        return None
    parent = directory.parent.parent / card.graph_of.model / directory.name
    try:
        return ModelCard.read(parent)
    except CardError as exc:
        log.warning("%s: cannot read %s (%s); its token ids go unchecked", card.name, parent, exc)
        return None


KINDS = {cls.kind: cls for cls in (Classifier, LanguageModel, Captioner, Graph)}


def load_model(directory: Path, sessions: SessionFactory | str) -> Model:
    """Build the runtime for one model version directory; `sessions` may be a device name."""
    if isinstance(sessions, str):
        sessions = SessionFactory(sessions)
    try:
        card = ModelCard.read(directory)
    except CardError as exc:
        raise ModelLoadError(f"{directory}: unreadable {MODEL_CARD} ({exc})") from exc
    cls = KINDS[card.kind]
    try:
        return cls(directory, card, sessions)
    except (DeviceError, ModelLoadError):
        raise  # a device we cannot give is not a per-model problem; the other says why
    except Exception as exc:
        raise ModelLoadError(f"{directory}: {type(exc).__name__}: {exc}") from exc
