"""A model's `config.pbtxt` (Triton's ModelConfig, text format), read once at load.

`<root>/<name>/config.pbtxt` sits beside the version directories, as in Triton, and
is parsed with protobuf's text format against `protos/inference/model_config.proto`
(Triton's names and numbers), so the same repository loads in Triton. Absent: the
defaults below. Malformed or inconsistent: that model fails to load with the line
and field named; the others serve.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from serving._proto.inference import model_config_pb2 as mc
from serving.core.card import ModelCard, TensorSpec
from serving.errors import ModelLoadError

CONFIG_FILE = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
DEFAULT_SEQUENCE_IDLE_US = 60_000_000
# What export writes, and the bound a config without one (0: Triton's "no batching")
# still gets from the server: no request may run a batch larger than this.
DEFAULT_MAX_BATCH_SIZE = 64
# numpy dtype names (model.json) <-> Triton data types.
DATA_TYPES = {
    "bool": mc.TYPE_BOOL,
    "uint8": mc.TYPE_UINT8,
    "int8": mc.TYPE_INT8,
    "int32": mc.TYPE_INT32,
    "int64": mc.TYPE_INT64,
    "float16": mc.TYPE_FP16,
    "float32": mc.TYPE_FP32,
    "float64": mc.TYPE_FP64,
}

ModelConfig = mc.ModelConfig


def read_model_config(model_dir: Path, card: ModelCard) -> ModelConfig:
    """The parsed and checked config of the model in `model_dir` (defaults if absent)."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return ModelConfig(name=card.name, platform=PLATFORM)
    try:
        text = path.read_text()
        config = text_format.Parse(text, ModelConfig())
    except text_format.ParseError as exc:
        line = exc.GetLine() if exc.GetLine() else 0
        source = text.splitlines()[line - 1].strip() if 0 < line <= len(text.splitlines()) else ""
        raise ModelLoadError(f"{path}:{line}: {exc} (in `{source[:120]}`)") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    problem = _check(config, card, Path(model_dir).name)
    if problem:
        raise ModelLoadError(f"{path}: {problem}")
    return config


def _check(config: ModelConfig, card: ModelCard, directory: str) -> str:
    if config.name and config.name != directory:
        return f"name: {config.name!r} is not the model directory's name {directory!r}"
    if config.platform and config.platform != PLATFORM:
        return f"platform: {config.platform!r}; stepwise serves {PLATFORM!r} only"
    if config.backend and config.backend != "onnxruntime":
        return f"backend: {config.backend!r}; stepwise serves 'onnxruntime' only"
    if config.max_batch_size < 0:
        return f"max_batch_size: {config.max_batch_size}; allowed 0 or more"
    shapes = {t.name: list(t.shape[1:]) for t in [*card.inputs, *card.outputs]}
    for field, tensors in (("input", config.input), ("output", config.output)):
        for i, tensor in enumerate(tensors):
            if tensor.name not in shapes:
                return f"{field}[{i}].name: {tensor.name!r} is not a tensor of the graph"
            if tensor.dims and list(tensor.dims) != shapes[tensor.name]:
                return (
                    f"{field}[{i}].dims: {list(tensor.dims)}; the graph's {tensor.name!r} "
                    f"is {shapes[tensor.name]} (without the batch axis)"
                )
    if config.HasField("dynamic_batching"):
        for size in config.dynamic_batching.preferred_batch_size:
            if not 1 <= size <= max(config.max_batch_size, 1):
                return (
                    f"dynamic_batching.preferred_batch_size: {size}; allowed 1 to "
                    f"max_batch_size ({config.max_batch_size})"
                )
    states = {s.input: s.output for s in card.state}
    for i, state in enumerate(config.sequence_batching.state):
        if states.get(state.input_name) != state.output_name:
            return (
                f"sequence_batching.state[{i}]: {state.input_name!r} -> "
                f"{state.output_name!r} is not a state pair of the graph ({states})"
            )
    return ""


def _tensor(spec: TensorSpec, cls):
    dims = spec.shape[1:]  # Triton leaves the batch dimension out
    return cls(name=spec.name, data_type=DATA_TYPES[spec.dtype], dims=dims)


def config_for_card(card: ModelCard, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> ModelConfig:
    """What export writes beside a model: its `model.onnx` as Triton would serve it.
    Step models get a sequence batcher whose implicit state maps each state input to
    its output (zero at the start of a sequence); their state is batch-first."""
    config = ModelConfig(name=card.name, platform=PLATFORM, max_batch_size=max_batch_size)
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    config.input.extend(_tensor(t, mc.ModelInput) for t in card.visible(card.inputs))
    config.output.extend(_tensor(t, mc.ModelOutput) for t in card.visible(card.outputs))
    if card.state:
        seq = config.sequence_batching
        seq.max_sequence_idle_microseconds = DEFAULT_SEQUENCE_IDLE_US
        seq.oldest.max_candidate_sequences = max_batch_size
        for s in card.state:
            dims = s.shape[1:]  # batch-first
            entry = seq.state.add(
                input_name=s.input, output_name=s.output, data_type=DATA_TYPES[s.dtype], dims=dims
            )
            entry.initial_state.add(
                data_type=DATA_TYPES[s.dtype], dims=dims, zero_data=True, name="zero"
            )
    return config


def to_text(config: ModelConfig) -> str:
    return text_format.MessageToString(config)
