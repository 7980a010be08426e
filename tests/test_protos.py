"""The committed stubs are exactly what `make protos` generates from the .proto files."""

from __future__ import annotations

from pathlib import Path

from protos.generate import DEFAULT_OUT, generate


def test_generated_stubs_are_not_stale(tmp_path):
    fresh = {p.relative_to(tmp_path): p.read_text() for p in generate(tmp_path)}
    assert fresh, "no stubs generated"
    committed_files = {
        p.relative_to(DEFAULT_OUT)
        for p in DEFAULT_OUT.rglob("*")
        if p.suffix in (".py", ".pyi") and p.name != "__init__.py"
    }
    assert committed_files == {rel for rel in fresh if rel.name != "__init__.py"}, (
        "stubs without a .proto, or missing: run `make protos` and remove leftovers"
    )
    for rel, text in fresh.items():
        committed = DEFAULT_OUT / rel
        assert committed.is_file(), f"{committed} missing: run `make protos`"
        assert committed.read_text() == text, f"{committed} is stale: run `make protos`"


def test_stubs_import_under_serving():
    from serving._proto.stepwise.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "stepwise.v1"
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert Path(inference_pb2.__file__).parent == DEFAULT_OUT / "stepwise" / "v1"
