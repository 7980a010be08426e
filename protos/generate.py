"""Generate the Python stubs for every .proto under protos/ into serving/_proto/.

grpc_tools writes absolute imports named after the proto package
(`from stepwise.v1 import inference_pb2`); they are rewritten to live under
`serving._proto` so the stubs need no sys.path tricks. Used by `make protos`
and by the test that fails when the committed stubs are stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "serving" / "_proto"
PACKAGE_PREFIX = "serving._proto"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Write the stubs into out_dir; return the files written."""
    import grpc_tools  # dev dependency, only needed here
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    ours = "|".join(sorted({p.relative_to(PROTO_ROOT).parts[0] for p in proto_files()}))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = re.sub(  # only our own packages move; google.protobuf stays put
                rf"^from ((?:{ours})(?:\.\S+)?) import (\S+_pb2)",
                lambda m: f"from {PACKAGE_PREFIX}.{m.group(1)} import {m.group(2)}",
                src.read_text(),
                flags=re.MULTILINE,
            )
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
            written.append(dst)
        for package in {out_dir, *(p.parent for p in written)}:
            while package != out_dir.parent:
                (package / "__init__.py").touch()
                package = package.parent
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(f"wrote {path}")
