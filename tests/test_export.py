"""Export: verified graphs, complete model cards, nothing half-written on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import export.onnx_export as onnx_export
from export.__main__ import export_checkpoint
from export.verify import VerificationError
from serving.core.card import CardError, GraphOf, ModelCard, TensorSpec
from training.captioner import CaptionerConfig
from training.checkpoint import save_checkpoint
from training.registry import get_arch


@pytest.fixture(scope="module")
def captioner_repository(tmp_path_factory):
    """An untrained tiny captioner, exported (verification included): `captioner` and
    `captioner_encoder`."""
    root = tmp_path_factory.mktemp("captioner")
    torch.manual_seed(0)
    words = ["<end>", "<start>", "a", "red", "blue", "circle", "square"]
    config = CaptionerConfig(vocab=words, width=0.125, embed_dim=8, hidden_size=16, max_length=6)
    model = get_arch("captioner").model_cls(config).eval()
    save_checkpoint(root / "captioner.pt", "captioner", model, None, 1, {})
    export_checkpoint(root / "captioner.pt", root / "repo")
    return root / "repo"


def test_classifier_card_carries_what_serving_needs(repository):
    version = repository / "lenet5" / "1"
    card = ModelCard.read(version)
    assert card.kind == "classifier" and card.labels == tuple(str(i) for i in range(10))
    assert card.inputs[0] == TensorSpec("input", "float32", (-1, 1, 32, 32))
    pre = card.preprocess
    assert (pre.color_mode, pre.height, pre.width) == ("L", 32, 32)
    assert card.verification["checked_batches"] == [1, 3, 7]
    metrics = json.loads((version / "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1
    graph = onnx.load(str(version / "model.onnx"))
    props = {p.key: p.value for p in graph.metadata_props}
    # The whole card travels in the graph, as model.json holds it.
    assert props["stepwise.model_card"] == json.dumps(card.to_json(), sort_keys=True)
    assert props["stepwise.kind"] == "classifier"
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]


def test_language_model_step_and_prefill_graphs(repository):
    version = repository / "char_lstm" / "1"
    card = ModelCard.read(version)
    assert card.graphs == {"step": "model.onnx", "prefill": "prefill.onnx"}
    assert card.vocab[0] == "<eos>" and card.eos == 0
    assert [(s.input, s.output) for s in card.state] == [("h", "h_next"), ("c", "c_next")]
    assert card.verification["rollout_steps"] == 200
    assert "val_loss_nats_per_char" in json.loads((version / "metrics.json").read_text())

    def io_shapes(name):
        g = onnx.load(str(version / name)).graph
        return {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.output]
        }

    step, prefill = io_shapes("model.onnx"), io_shapes("prefill.onnx")
    assert step["tokens"][1] == 1 and isinstance(prefill["tokens"][1], str)
    # Batch-first state, as Triton batches: [B, L, H], and the card says so.
    assert step["h"] == [step["h"][0], 2, 48] and isinstance(step["h"][0], str)
    assert card.state[0].shape == (-1, 2, 48) and step["logits"][1] == len(card.vocab)
    assert set(step) == set(prefill) == {"tokens", "h", "c", "logits", "h_next", "c_next"}


def test_other_graphs_are_published_as_plain_tensor_models(repository):
    """The prefill graph is a model of its own, `char_lstm_prefill`: its card and
    config.pbtxt read from the graph (batch-first state as plain inputs and outputs), the
    same bytes as the language model's prefill.onnx, and it runs as that graph does."""
    from serving.core.model_config import read_model_config
    from serving.core.models import Graph, load_model

    sub = repository / "char_lstm_prefill" / "1"
    card = ModelCard.read(sub)
    assert card.kind == "graph"
    assert card.graph_of == GraphOf(model="char_lstm", graph="prefill")
    assert card.inputs == (
        TensorSpec("tokens", "int64", (-1, -1)),
        TensorSpec("h", "float32", (-1, 2, 48)),
        TensorSpec("c", "float32", (-1, 2, 48)),
    )
    assert [o.name for o in card.outputs] == ["logits", "h_next", "c_next"]
    original = repository / "char_lstm" / "1" / "prefill.onnx"
    assert (sub / "model.onnx").read_bytes() == original.read_bytes()
    config = read_model_config(sub.parent, card)
    assert config.name == "char_lstm_prefill" and config.max_batch_size == 64
    assert [(t.name, list(t.dims)) for t in config.input] == [
        ("tokens", [-1]), ("h", [2, 48]), ("c", [2, 48])
    ]  # fmt: skip
    assert not config.HasField("sequence_batching")  # the client carries the state
    graph, lm = load_model(sub, "cpu"), load_model(repository / "char_lstm" / "1", "cpu")
    assert isinstance(graph, Graph)
    tokens = np.asarray([[1, 5, 7], [2, 2, 9]], np.int64)
    logits, state = lm.run("prefill", tokens, lm.zero_state(2))
    out = graph.session.run(None, {"tokens": tokens, **lm.zero_state(2)})
    assert np.array_equal(out[0], logits) and np.array_equal(out[1], state["h"])
    # Readable by a server running as another user (mkdtemp/mkstemp default to 0700/0600).
    assert (sub.stat().st_mode & 0o777) == 0o755
    assert ((sub.parent / "config.pbtxt").stat().st_mode & 0o777) == 0o644


def test_every_exported_card_round_trips(repository, captioner_repository):
    """Each model.json export writes reads back as a ModelCard that writes the same
    JSON, byte for byte: every kind, the published graphs included."""
    versions = sorted([*repository.glob("*/1"), *captioner_repository.glob("*/1")])
    kinds = set()
    for version in versions:
        text = (version / "model.json").read_text()
        card = ModelCard.read(version)
        assert card.to_json() == json.loads(text), version
        assert json.dumps(card.to_json(), indent=2, sort_keys=True) + "\n" == text, version
        kinds.add(card.kind)
    assert kinds == {"classifier", "language_model", "captioner", "graph"}
    captioner = ModelCard.read(captioner_repository / "captioner" / "1")
    assert (captioner.eos, captioner.start_token, captioner.max_length) == (0, 1, 6)
    assert captioner.encoder.outputs == captioner.inputs[1:]  # the decoder's initial h, c
    assert captioner.graphs == {"step": "model.onnx", "encoder": "encoder.onnx"}
    encoder = ModelCard.read(captioner_repository / "captioner_encoder" / "1")
    assert encoder.graph_of == GraphOf("captioner", "encoder")
    image_to_state = captioner.encoder
    assert (encoder.inputs, encoder.outputs) == (image_to_state.inputs, image_to_state.outputs)


def _without(data: dict, *path):
    """A deep copy of `data` without the entry at `path` (keys and list indices)."""
    data = json.loads(json.dumps(data))
    *parents, last = path
    inner = data
    for key in parents:
        inner = inner[key]
    del inner[last]
    return data


@pytest.mark.parametrize(
    ("model", "edit", "message"),
    [
        ("char_lstm", lambda d: _without(d, "vocab"), "language_model card needs vocab"),
        ("char_lstm", lambda d: _without(d, "special_tokens"), "language_model card needs eos"),
        ("char_lstm", lambda d: _without(d, "state"), "language_model card needs state"),
        ("char_lstm", lambda d: {**d, "graphs": {"prefill": "prefill.onnx"}}, "'step'"),
        ("lenet5", lambda d: _without(d, "labels"), "classifier card needs labels"),
        ("lenet5", lambda d: _without(d, "preprocess"), "classifier card needs preprocess"),
        ("lenet5", lambda d: _without(d, "inputs", 0, "shape"), "'shape'"),
        ("lenet5", lambda d: {**d, "kind": "detector"}, "kind 'detector'"),
        ("captioner", lambda d: _without(d, "max_length"), "captioner card needs max_length"),
        ("captioner", lambda d: _without(d, "encoder"), "captioner card needs encoder"),
        ("captioner", lambda d: _without(d, "graphs", "encoder"), "'encoder'"),
        ("char_lstm_prefill", lambda d: _without(d, "graph_of"), "graph card needs graph_of"),
    ],
)
def test_a_card_missing_what_its_kind_needs_is_refused(
    repository, captioner_repository, tmp_path, model, edit, message
):
    root = captioner_repository if model.startswith("captioner") else repository
    data = json.loads((root / model / "1" / "model.json").read_text())
    ModelCard.from_json(data)  # as exported: accepted
    (tmp_path / "model.json").write_text(json.dumps(edit(data)))
    with pytest.raises(CardError, match=message):
        ModelCard.read(tmp_path)


def test_a_state_shape_needs_one_batch_axis(repository):
    card = ModelCard.read(repository / "char_lstm" / "1")
    data = card.to_json()
    for shape in ([1, 2, 48], [-1, -1, 48]):
        data["state"][0]["shape"] = shape
        with pytest.raises(CardError, match=r"state h: shape .* needs one -1 \(batch\)"):
            ModelCard.from_json(data)
    with pytest.raises(CardError, match="captioner card needs .*max_length"):
        card.replace(kind="captioner")  # nor an encoder, a preprocess or max_length


def test_an_exporter_that_leaves_out_a_field_writes_nothing(tmp_path, checkpoints, monkeypatch):
    """The card is checked when export builds it, before anything is published."""
    exporter = onnx_export.EXPORTERS["language_model"]

    def without_vocab(model, out_dir):
        fields = exporter(model, out_dir)
        del fields["vocab"]
        return fields

    monkeypatch.setitem(onnx_export.EXPORTERS, "language_model", without_vocab)
    with pytest.raises(CardError, match="char_lstm: a language_model card needs vocab"):
        export_checkpoint(checkpoints["char_lstm"], tmp_path)
    assert list(tmp_path.iterdir()) == []  # no model, no staging leftovers


def _corrupting(monkeypatch):
    """Make every exported graph differ from its PyTorch source by a small weight change."""
    original = onnx_export._export

    def export_then_corrupt(module, args, path, *rest):
        original(module, args, path, *rest)
        graph = onnx.load(str(path))
        init = next(t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
        values = onnx.numpy_helper.to_array(init) + np.float32(1e-2)
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
        onnx.save(graph, str(path))

    monkeypatch.setattr(onnx_export, "_export", export_then_corrupt)


@pytest.mark.parametrize("name", ["lenet5", "char_lstm"])
def test_failed_verification_writes_nothing(tmp_path, checkpoints, monkeypatch, name):
    _corrupting(monkeypatch)
    with pytest.raises(VerificationError, match="ONNX - PyTorch"):
        export_checkpoint(checkpoints[name], tmp_path)
    assert list(tmp_path.iterdir()) == []  # no model, no staging leftovers


def test_reexport_replaces_the_version(tmp_path, checkpoints):
    first = export_checkpoint(checkpoints["lenet5"], tmp_path, name="digits")
    (first / "stale.txt").write_text("old")
    second = export_checkpoint(checkpoints["lenet5"], tmp_path, name="digits")
    assert first == second and not (second / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_cli_missing_checkpoint_is_one_line_and_nonzero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            str(tmp_path / "none.pt"),
            "--repository",
            str(tmp_path / "repo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("export failed: checkpoint not found")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_cli_rejects_a_version_serving_would_never_load(tmp_path, checkpoints):
    proc = subprocess.run(
        [sys.executable, "-m", "export", str(checkpoints["lenet5"]), "--repository",
         str(tmp_path), "--version", "v2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--version must be a positive integer" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_checkpoint_that_does_not_rebuild_is_a_clear_error(tmp_path, checkpoints):
    import torch

    from training.checkpoint import CheckpointError, load_checkpoint

    ckpt = torch.load(checkpoints["lenet5"], weights_only=True)
    ckpt["config"]["no_such_field"] = 1
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="does not rebuild"):
        load_checkpoint(tmp_path / "odd.pt")
