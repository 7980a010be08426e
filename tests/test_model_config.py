"""config.pbtxt: written by export as Triton's ModelConfig, read once by serving."""

from __future__ import annotations

import shutil

from google.protobuf import text_format

from bench.harness import loopback_config
from export.repository import write_model_config
from serving._proto.inference import model_config_pb2 as mc
from serving.app import create_server
from serving.core.repository import ModelRegistry


def _read(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_export_writes_a_triton_config_beside_the_versions(repository):
    lenet = _read(repository / "lenet5" / "config.pbtxt")
    assert (lenet.name, lenet.platform, lenet.max_batch_size) == ("lenet5", "onnxruntime_onnx", 64)
    assert [(t.name, list(t.dims), t.data_type) for t in lenet.input] == [
        ("input", [1, 32, 32], mc.TYPE_FP32)
    ]
    assert [(t.name, list(t.dims)) for t in lenet.output] == [("logits", [10])]
    assert not lenet.HasField("dynamic_batching")  # off unless an operator turns it on

    lm = _read(repository / "char_lstm" / "config.pbtxt")
    assert [t.name for t in lm.input] == ["tokens"] and [t.name for t in lm.output] == ["logits"]
    states = [(s.input_name, s.output_name, list(s.dims)) for s in lm.sequence_batching.state]
    assert states == [("h", "h_next", [2, 48]), ("c", "c_next", [2, 48])]  # batch-first [B, L, H]
    assert all(s.initial_state[0].zero_data for s in lm.sequence_batching.state)
    assert lm.sequence_batching.max_sequence_idle_microseconds == 60_000_000
    assert lm.sequence_batching.WhichOneof("strategy_choice") == "oldest"


def test_an_operators_config_is_kept_when_a_version_is_exported(tmp_path, repository):
    model_dir = tmp_path / "lenet5"
    shutil.copytree(repository / "lenet5", model_dir)
    edited = 'name: "lenet5"\nmax_batch_size: 8\ndynamic_batching { }\n'
    (model_dir / "config.pbtxt").write_text(edited)
    write_model_config(model_dir, {"name": "lenet5", "inputs": [], "outputs": []})
    assert (model_dir / "config.pbtxt").read_text() == edited


def _repo_with(tmp_path, repository, name: str, text: str):
    root = tmp_path / "repo"
    for model in ("lenet5", "char_lstm"):
        shutil.copytree(repository / model, root / model)
    (root / name / "config.pbtxt").write_text(text)
    return root


def test_a_malformed_config_fails_that_model_alone_naming_line_and_field(tmp_path, repository):
    text = 'name: "lenet5"\nmax_batch_size: 8\nmax_batch_sise: 9\n'
    registry = ModelRegistry.load(_repo_with(tmp_path, repository, "lenet5", text), "cpu")
    assert "lenet5" not in registry.models and set(registry.models) == {"char_lstm"}
    error = registry.failed["lenet5"]
    assert "config.pbtxt:3:" in error and "max_batch_sise" in error


def test_an_inconsistent_config_names_the_field(tmp_path, repository):
    cases = {
        'name: "other"': "name:",
        'platform: "tensorflow_savedmodel"': "platform:",
        'input { name: "pixels" }': "input[0].name",
        'input { name: "input" dims: [3, 32, 32] }': "input[0].dims",
        'sequence_batching { state { input_name: "h" output_name: "c_next" } }':
            "sequence_batching.state[0]",
    }  # fmt: skip
    for i, (text, field) in enumerate(cases.items()):
        model = "char_lstm" if "sequence" in text else "lenet5"
        registry = ModelRegistry.load(_repo_with(tmp_path / str(i), repository, model, text), "cpu")
        assert model not in registry.models and field in registry.failed[model], text


def test_dynamic_batching_in_a_config_batches_that_model_only(tmp_path, repository):
    text = (
        'name: "lenet5"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        "dynamic_batching { preferred_batch_size: 4 max_queue_delay_microseconds: 100 }\n"
    )
    root = _repo_with(tmp_path, repository, "lenet5", text)
    (root / "char_lstm" / "config.pbtxt").write_text('name: "char_lstm"\nmax_batch_size: 3\n')
    server, _ = create_server(loopback_config(root))
    try:
        assert set(server.batchers) == {"lenet5"}
        batching = server.batchers["lenet5"].config
        assert (batching.max_batch_size, batching.max_queue_delay_us) == (8, 100)
        assert batching.preferred_batch_sizes == (4,)
        assert server.engines["char_lstm"].scheduler.config.max_batch_size == 3
    finally:
        server.stop(None)
