"""The model card, `model.json`: everything serving needs to know about a model, beside
its graphs. Export writes it (`ModelCard.write`), serving reads it (`ModelCard.read`);
both use these types, so a field is named once.

Frozen dataclasses, checked on construction: a card that lacks what its kind needs is
refused when it is read, never half-served. Shapes use -1 for a dynamic dimension; a
state tensor has exactly one, its batch axis. Fields serving never reads (training
config, verification figures, provenance) are kept as they were written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from serving.errors import CardError

__all__ = [
    "KINDS",
    "MODEL_CARD",
    "CardError",
    "GraphIO",
    "GraphOf",
    "ModelCard",
    "Preprocess",
    "StateSpec",
    "TensorSpec",
]

MODEL_CARD = "model.json"
KINDS = ("classifier", "language_model", "captioner", "graph")


def _frozen(mapping: Mapping | None) -> Mapping:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name: "float32", "int64"
    shape: tuple[int, ...]  # -1: dynamic

    @classmethod
    def from_json(cls, data: Mapping) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StateSpec:
    """A recurrent state tensor: fed as `input`, returned as `output` at each step."""

    input: str
    output: str
    dtype: str
    shape: tuple[int, ...]  # exactly one -1: the batch axis

    def __post_init__(self):
        if list(self.shape).count(-1) != 1:
            raise CardError(f"state {self.input}: shape {list(self.shape)} needs one -1 (batch)")

    @property
    def batch_axis(self) -> int:
        return self.shape.index(-1)

    def zeros_shape(self, batch: int) -> list[int]:
        return [batch if d == -1 else d for d in self.shape]

    @classmethod
    def from_json(cls, data: Mapping) -> StateSpec:
        return cls(
            str(data["input"]),
            str(data["output"]),
            str(data["dtype"]),
            tuple(int(d) for d in data["shape"]),
        )

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class Preprocess:
    """How an encoded image becomes the model's [C, H, W] input (`serving.core.preprocess`):
    converted to `color_mode` over `background`, resized, scaled, normalized."""

    color_mode: str  # Pillow's: "L" or "RGB"
    width: int
    height: int
    mean: tuple[float, ...]  # per channel, after `scale`
    std: tuple[float, ...]
    scale: float = 1 / 255
    resample: str = "bilinear"
    background: tuple[int, ...] | None = None  # what transparency is flattened over

    @classmethod
    def from_json(cls, data: Mapping) -> Preprocess:
        background = data.get("background")
        return cls(
            str(data["color_mode"]),
            int(data["width"]),
            int(data["height"]),
            tuple(float(v) for v in data["mean"]),
            tuple(float(v) for v in data["std"]),
            float(data.get("scale", 1 / 255)),
            str(data.get("resample", "bilinear")),
            None if background is None else tuple(int(v) for v in background),
        )

    def to_json(self) -> dict:
        out = {
            "color_mode": self.color_mode,
            "width": self.width,
            "height": self.height,
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "resample": self.resample,
        }
        if self.background is not None:
            out["background"] = list(self.background)
        return out


@dataclass(frozen=True)
class GraphIO:
    """A second graph's tensors (the captioner's encoder: image -> initial state)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_json(cls, data: Mapping) -> GraphIO:
        return cls(_specs(data["inputs"]), _specs(data["outputs"]))

    def to_json(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }


@dataclass(frozen=True)
class GraphOf:
    """A graph of another model, published on its own as `<model>_<graph>`."""

    model: str
    graph: str


def _int_or_none(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CardError(f"{value!r} is not an integer")
    return value


def _specs(items) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(s) for s in items)


@dataclass(frozen=True)
class ModelCard:
    name: str
    kind: str  # one of KINDS
    graphs: Mapping[str, str]  # graph name ("model", "step", "prefill", "encoder") -> file
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    version: str = ""
    arch: str = ""
    labels: tuple[str, ...] = ()  # a classifier's class names
    preprocess: Preprocess | None = None  # classifiers and captioners
    vocab: tuple[str, ...] = ()  # step models: token id -> text
    eos: int | None = None  # step models: the end token
    bos: int | None = None  # the start token (defaults to eos)
    state: tuple[StateSpec, ...] = ()  # step models
    cell: str = ""  # a language model's recurrent cell
    max_length: int = 0  # a captioner's longest caption
    encoder: GraphIO | None = None  # a captioner's image encoder
    graph_of: GraphOf | None = None  # kind "graph": whose graph it is
    # Kept as written, read by tools and people, not by serving:
    config: Mapping = field(default_factory=dict)  # the training config
    verification: Mapping = field(default_factory=dict)  # what export checked
    exported_at: str = ""
    exported_with: Mapping = field(default_factory=dict)
    training_step: int | None = None

    def __post_init__(self):
        for name in ("graphs", "config", "verification", "exported_with"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if self.kind not in KINDS:
            raise CardError(f"kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        need = {
            "classifier": ("labels", "preprocess"),
            "language_model": ("vocab", "eos", "state"),
            "captioner": ("vocab", "eos", "state", "preprocess", "encoder"),
            "graph": ("graph_of",),
        }[self.kind]
        missing = [n for n in need if getattr(self, n) is None or getattr(self, n) == ()]
        if self.kind == "captioner" and self.max_length < 1:
            missing.append("max_length")
        if missing:
            raise CardError(f"{self.name}: a {self.kind} card needs {', '.join(missing)}")
        wanted = {"classifier": "model", "graph": "model", "captioner": "encoder"}
        graphs = ["step"] if self.state else [wanted[self.kind]]
        if self.kind == "captioner":
            graphs.append("encoder")
        if absent := [g for g in graphs if g not in self.graphs]:
            raise CardError(f"{self.name}: graphs {absent} missing from {dict(self.graphs)}")

    @property
    def start_token(self) -> int:
        return self.eos if self.bos is None else self.bos

    @property
    def state_names(self) -> frozenset[str]:
        """Every state tensor's name, as input and as output: implicit in Triton's
        sequence batcher, so left out of the metadata and config a client sees."""
        return frozenset(n for s in self.state for n in (s.input, s.output))

    def visible(self, specs: tuple[TensorSpec, ...]) -> list[TensorSpec]:
        """`specs` without the state tensors."""
        return [s for s in specs if s.name not in self.state_names]

    # -- model.json ------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Mapping) -> ModelCard:
        if not isinstance(data, Mapping):
            raise CardError(f"{MODEL_CARD} holds a {type(data).__name__}, not an object")
        try:
            special = data.get("special_tokens", {})
            preprocess, encoder, graph_of = (
                data.get(k) for k in ("preprocess", "encoder", "graph_of")
            )
            return cls(
                name=str(data["name"]),
                kind=str(data["kind"]),
                graphs=dict(data["graphs"]),
                inputs=_specs(data["inputs"]),
                outputs=_specs(data["outputs"]),
                version=str(data.get("version", "")),
                arch=str(data.get("arch", "")),
                labels=tuple(str(x) for x in data.get("labels", ())),
                preprocess=Preprocess.from_json(preprocess) if preprocess else None,
                vocab=tuple(str(x) for x in data.get("vocab", ())),
                eos=_int_or_none(special.get("eos")),
                bos=_int_or_none(special.get("bos")),
                state=tuple(StateSpec.from_json(s) for s in data.get("state", ())),
                cell=str(data.get("cell", "")),
                max_length=int(data.get("max_length", 0)),
                encoder=GraphIO.from_json(encoder) if encoder else None,
                graph_of=GraphOf(str(graph_of["model"]), str(graph_of["graph"]))
                if graph_of
                else None,
                config=data.get("config", {}),
                verification=data.get("verification", {}),
                exported_at=str(data.get("exported_at", "")),
                exported_with=data.get("exported_with", {}),
                training_step=_int_or_none(data.get("training_step")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, CardError):
                raise
            raise CardError(f"{MODEL_CARD} field {exc!r} missing or malformed") from exc

    def to_json(self) -> dict:
        """What `model.json` holds: the fields set, in export's names."""
        out = {
            "name": self.name,
            "kind": self.kind,
            "graphs": dict(self.graphs),
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
        }
        optional = {
            "version": self.version,
            "arch": self.arch,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_json() if self.preprocess else None,
            "vocab": list(self.vocab),
            "state": [s.to_json() for s in self.state],
            "cell": self.cell,
            "max_length": self.max_length or None,
            "encoder": self.encoder.to_json() if self.encoder else None,
            "graph_of": {"model": self.graph_of.model, "graph": self.graph_of.graph}
            if self.graph_of
            else None,
            "config": dict(self.config),
            "verification": dict(self.verification),
            "exported_at": self.exported_at,
            "exported_with": dict(self.exported_with),
            "training_step": self.training_step,
        }
        if self.eos is not None:
            optional["special_tokens"] = {
                "eos": self.eos,
                **({"bos": self.bos} if self.bos is not None else {}),
            }
        out.update({k: v for k, v in optional.items() if v is not None and v not in ("", [], {})})
        return out

    @classmethod
    def read(cls, directory: Path) -> ModelCard:
        path = Path(directory) / MODEL_CARD
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CardError(f"{path}: unreadable ({exc})") from exc
        return cls.from_json(data)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MODEL_CARD
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    def replace(self, **changes) -> ModelCard:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ModelCard(**values)
