"""Turn a trained model into verified ONNX graphs plus the metadata serving needs.

Classifiers: one graph `model.onnx`, `input` [B, C, H, W] -> `logits` [B, K].
Language models: a step graph `model.onnx` (`tokens` [B, 1], `h`, `c` [B, L, H],
batch-first as Triton batches -> `logits` [B, V], `h_next`, `c_next`) and a prefill
graph `prefill.onnx` with the same names and a dynamic T axis on `tokens`, to consume
a whole prompt in one call.

Each exporter returns the card fields its graphs decide, as `ModelCard` keywords;
`export.__main__` adds where the model came from and builds the card once.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export import verify
from serving.core.card import GraphIO, ModelCard, Preprocess, StateSpec, TensorSpec
from training.captioner import END_ID as CAPTION_END_ID
from training.captioner import START_ID as CAPTION_START_ID
from training.char_lm import BOS_ID, EOS_ID
from training.data.digits import BACKGROUND as DIGITS_BACKGROUND
from training.data.scenes import BACKGROUND as SCENES_BACKGROUND

OPSET = 17


class _LastStep(nn.Module):
    """Adapts `forward(tokens, state)` to named tensors: logits at the last position.

    The graph's state is batch-first, [B, L, H], as Triton's batchers expect (they
    batch along the first dimension); PyTorch's recurrent modules keep [L, B, H]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, *state):
        state = tuple(s.transpose(0, 1) for s in state)  # [B, L, H] -> [L, B, H]
        logits, state = self.model(tokens, state)  # logits: [B, T, V]
        return logits[:, -1], *(s.transpose(0, 1) for s in state)


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic_axes: dict,
) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def stamp_model_card(path: Path, card: ModelCard) -> None:
    """Copy the model card into the graph's metadata_props, so the .onnx stands alone."""
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(
        graph,
        {
            "stepwise.model_card": json.dumps(card.to_json(), sort_keys=True),
            "stepwise.kind": card.kind,
        },
    )
    onnx.save(graph, str(path))


def _preprocess(
    channels: int, size: int, mean: list[float], std: list[float], background: tuple[int, ...]
) -> Preprocess:
    """What serving does to an image: composite transparent pixels onto the training
    data's background, convert, resize bilinearly, /255, (x - mean) / std."""
    return Preprocess(
        color_mode="L" if channels == 1 else "RGB",
        width=size,
        height=size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        scale=1 / 255,
        resample="bilinear",
        background=tuple(background),
    )


def export_classifier(model: nn.Module, out_dir: Path) -> dict:
    """`model.onnx`; its card fields (`ModelCard` keywords)."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    path = out_dir / "model.onnx"
    _export(
        model,
        (torch.zeros(2, *shape),),
        path,
        ["input"],
        ["logits"],
        {"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    checks = verify.verify_classifier(model, path, shape)
    return {
        "kind": "classifier",
        "graphs": {"model": "model.onnx"},
        "inputs": (TensorSpec("input", "float32", (-1, *shape)),),
        "outputs": (TensorSpec("logits", "float32", (-1, cfg.num_classes)),),
        "labels": tuple(cfg.labels),
        "preprocess": _preprocess(
            cfg.in_channels,
            cfg.image_size,
            [cfg.mean] * cfg.in_channels,
            [cfg.std] * cfg.in_channels,
            DIGITS_BACKGROUND * cfg.in_channels,
        ),  # fmt: skip
        "verification": checks,
    }


def _export_decoder(model: nn.Module, out_dir: Path, with_prefill: bool) -> dict:
    """Step graph `model.onnx` (+ `prefill.onnx`) of a recurrent decoder; its card fields."""
    cfg = model.config
    layers, hidden = cfg.num_layers, cfg.hidden_size
    states = list(model.state_names)  # ["h", "c"] for an LSTM, ["h"] otherwise
    nexts = [f"{name}_next" for name in states]
    step = _LastStep(model.for_export()).eval()
    inputs, outputs = ["tokens", *states], ["logits", *nexts]
    state_axes = {name: {0: "batch"} for name in states + nexts}
    zeros = tuple(torch.zeros(2, layers, hidden) for _ in states)
    graphs = {"step": ("model.onnx", 1, {0: "batch"})}
    if with_prefill:
        graphs["prefill"] = ("prefill.onnx", 3, {0: "batch", 1: "time"})
    for graph, length, token_axes in graphs.values():
        axes = {"tokens": token_axes, "logits": {0: "batch"}, **state_axes}
        tokens = torch.zeros(2, length, dtype=torch.long)
        _export(step, (tokens, *zeros), out_dir / graph, inputs, outputs, axes)
    state_shape = (-1, layers, hidden)  # batch-first
    return {
        "graphs": {name: spec[0] for name, spec in graphs.items()},
        "inputs": (
            TensorSpec("tokens", "int64", (-1, 1)),
            *(TensorSpec(n, "float32", state_shape) for n in states),
        ),
        "outputs": (
            TensorSpec("logits", "float32", (-1, cfg.vocab_size)),
            *(TensorSpec(o, "float32", state_shape) for o in nexts),
        ),
        # Each state input is fed back from its output at the next step.
        "state": tuple(
            StateSpec(n, o, "float32", state_shape) for n, o in zip(states, nexts, strict=True)
        ),
        "vocab": tuple(cfg.vocab),
    }


def export_char_lm(model: nn.Module, out_dir: Path) -> dict:
    """`model.onnx` (step) and `prefill.onnx`; their card fields (`ModelCard` keywords)."""
    return {
        "kind": "language_model",
        "cell": model.config.cell,
        **_export_decoder(model, out_dir, with_prefill=True),
        "verification": verify.verify_char_lm(
            model, out_dir / "model.onnx", out_dir / "prefill.onnx"
        ),
        # Generation starts from zero state, feeds BOS, then the prompt.
        "eos": EOS_ID,
        "bos": BOS_ID,
    }


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image):
        return tuple(s.transpose(0, 1) for s in self.model.encode(image))  # batch-first


def export_captioner(model: nn.Module, out_dir: Path) -> dict:
    """Two graphs: `encoder.onnx` (image -> the decoder's initial h, c) and the
    decoder's step graph `model.onnx`; their card fields (`ModelCard` keywords)."""
    cfg = model.config
    decoder = _export_decoder(model.decoder, out_dir, with_prefill=False)
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    axes = {"image": {0: "batch"}, "h": {0: "batch"}, "c": {0: "batch"}}
    _export(_Encoder(model).eval(), (torch.zeros(2, *shape),), out_dir / "encoder.onnx",
            ["image"], ["h", "c"], axes)  # fmt: skip
    return {
        "kind": "captioner",
        **decoder,
        "graphs": {**decoder["graphs"], "encoder": "encoder.onnx"},
        "encoder": GraphIO(
            inputs=(TensorSpec("image", "float32", (-1, *shape)),),
            outputs=decoder["inputs"][1:],  # h, c: the initial state
        ),
        "preprocess": _preprocess(
            cfg.in_channels, cfg.image_size, cfg.mean, cfg.std, SCENES_BACKGROUND
        ),
        "eos": CAPTION_END_ID,
        "bos": CAPTION_START_ID,
        "max_length": cfg.max_length,
        "verification": verify.verify_captioner(
            model, out_dir / "encoder.onnx", out_dir / "model.onnx"
        ),
    }


EXPORTERS = {
    "classifier": export_classifier,
    "language_model": export_char_lm,
    "captioner": export_captioner,
}
