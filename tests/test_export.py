"""Export: verified graphs, complete model cards, nothing half-written on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import export.onnx_export as onnx_export
from export.__main__ import export_checkpoint
from export.verify import VerificationError


def test_classifier_card_carries_what_serving_needs(repository):
    version = repository / "lenet5" / "1"
    card = json.loads((version / "model.json").read_text())
    assert card["kind"] == "classifier" and card["labels"] == [str(i) for i in range(10)]
    assert card["inputs"][0] == {"name": "input", "dtype": "float32", "shape": [-1, 1, 32, 32]}
    pre = card["preprocess"]
    assert (pre["color_mode"], pre["height"], pre["width"]) == ("L", 32, 32)
    assert card["verification"]["checked_batches"] == [1, 3, 7]
    metrics = json.loads((version / "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1
    graph = onnx.load(str(version / "model.onnx"))
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["stepwise.model_card"])["labels"] == card["labels"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]


def test_language_model_step_and_prefill_graphs(repository):
    version = repository / "char_lstm" / "1"
    card = json.loads((version / "model.json").read_text())
    assert card["graphs"] == {"step": "model.onnx", "prefill": "prefill.onnx"}
    assert card["vocab"][0] == "<eos>" and card["special_tokens"]["eos"] == 0
    assert [(s["input"], s["output"]) for s in card["state"]] == [("h", "h_next"), ("c", "c_next")]
    assert card["verification"]["rollout_steps"] == 200
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
    assert card["state"][0]["shape"] == [-1, 2, 48] and step["logits"][1] == len(card["vocab"])
    assert set(step) == set(prefill) == {"tokens", "h", "c", "logits", "h_next", "c_next"}


def test_other_graphs_are_published_as_plain_tensor_models(repository):
    """The prefill graph is a model of its own, `char_lstm_prefill`: its card and
    config.pbtxt read from the graph (batch-first state as plain inputs and outputs), the
    same bytes as the language model's prefill.onnx, and it runs as that graph does."""
    from serving.core.model_config import read_model_config
    from serving.core.models import Graph, load_model

    sub = repository / "char_lstm_prefill" / "1"
    card = json.loads((sub / "model.json").read_text())
    assert card["kind"] == "graph"
    assert card["graph_of"] == {"model": "char_lstm", "graph": "prefill"}
    assert card["inputs"] == [
        {"name": "tokens", "dtype": "int64", "shape": [-1, -1]},
        {"name": "h", "dtype": "float32", "shape": [-1, 2, 48]},
        {"name": "c", "dtype": "float32", "shape": [-1, 2, 48]},
    ]
    assert [o["name"] for o in card["outputs"]] == ["logits", "h_next", "c_next"]
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
