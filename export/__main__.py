"""`python -m export CHECKPOINT --repository DIR`: verify and publish a trained model.

Writes `DIR/<name>/<version>/` with the graph(s), `model.json` (what serving needs
to know: a `serving.core.card.ModelCard`, checked when it is built) and `metrics.json`
(the figures from training), and `DIR/<name>/config.pbtxt`.
A model's other graphs (a language model's prefill, the captioner's encoder) are also
published as plain-tensor models of their own, `DIR/<name>_<graph>/`, so that every graph
is reachable by name through the KServe V2 protocol, here and in Triton. Verification failures,
missing or corrupt checkpoints: one error line, exit status 1, nothing written.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
from pathlib import Path

import torch

from export.onnx_export import EXPORTERS, stamp_model_card
from export.repository import METRICS, link_or_copy, staged_version, write_json, write_model_config
from export.verify import VerificationError
from serving.core.card import GraphOf, ModelCard, TensorSpec
from training.checkpoint import CheckpointError, load_checkpoint
from training.registry import get_arch

log = logging.getLogger("export")


def export_checkpoint(
    checkpoint: Path, repository: Path, name: str | None = None, version: str = "1"
) -> Path:
    arch_name, model, ckpt = load_checkpoint(checkpoint)
    arch = get_arch(arch_name)
    name = name or arch_name
    with staged_version(repository, name, version) as staging:
        card = ModelCard(
            **EXPORTERS[arch.task](model, staging),  # what the graphs decide
            name=name,
            version=version,
            arch=arch_name,
            config=ckpt["config"],
            training_step=ckpt["step"],
            exported_with={"torch": torch.__version__},
            exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        for graph in card.graphs.values():
            stamp_model_card(staging / graph, card)
        card.write(staging)
        write_json(staging / METRICS, ckpt["metrics"])
    target = Path(repository) / name / version
    write_model_config(target.parent, card)
    for graph, filename in card.graphs.items():
        if graph not in ("model", "step"):  # model.onnx is the model itself
            export_graph_model(target / filename, repository, card, graph)
    log.info("exported %s (%s) to %s: %s", name, arch_name, target, dict(card.verification))
    return target


def export_graph_model(graph_file: Path, repository: Path, card: ModelCard, graph: str) -> Path:
    """Publish one graph of a model as a model of its own, `<name>_<graph>`, of kind
    `graph`: plain tensors in and out (the state as ordinary inputs and outputs), its
    inputs and outputs read from the ONNX file, the same version number."""
    inputs, outputs = graph_tensors(graph_file)
    sub = ModelCard(
        name=f"{card.name}_{graph}",
        kind="graph",
        version=card.version,
        graph_of=GraphOf(card.name, graph),
        graphs={"model": "model.onnx"},
        inputs=inputs,
        outputs=outputs,
        arch=card.arch,
        exported_with=card.exported_with,
        exported_at=card.exported_at,
        training_step=card.training_step,
    )
    with staged_version(repository, sub.name, sub.version) as staging:
        link_or_copy(graph_file, staging / "model.onnx")
        sub.write(staging)
    target = Path(repository) / sub.name / sub.version
    write_model_config(target.parent, sub)
    return target


def graph_tensors(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs as card entries: name, numpy dtype, shape (-1 for
    a dimension the graph leaves open)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(value.name, tensor_dtype_to_np_dtype(tensor.elem_type).name, shape)

    return tuple(spec(v) for v in graph.input), tuple(spec(v) for v in graph.output)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--name", help="model name in the repository (default: the architecture)")
    p.add_argument("--version", default="1")
    args = p.parse_args(argv)
    if not args.version.isdigit():
        p.error(f"--version must be a positive integer (serving loads numeric versions), "
                f"not {args.version!r}")  # fmt: skip
    try:
        export_checkpoint(args.checkpoint, args.repository, args.name, args.version)
    except (CheckpointError, VerificationError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for any failure
        print(f"export failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
