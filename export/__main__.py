"""`python -m export CHECKPOINT --repository DIR`: verify and publish a trained model.

Writes `DIR/<name>/<version>/` with the graph(s), `model.json` (what serving needs
to know) and `metrics.json` (the figures from training). Verification failures,
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
from export.repository import METRICS, MODEL_CARD, staged_version, write_json, write_model_config
from export.verify import VerificationError
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
        card = EXPORTERS[arch.task](model, staging)
        card.update(
            {
                "name": name,
                "version": version,
                "arch": arch_name,
                "config": ckpt["config"],
                "training_step": ckpt["step"],
                "exported_with": {"torch": torch.__version__},
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"
                ),
            }
        )
        for graph in card["graphs"].values():
            stamp_model_card(staging / graph, card)
        write_json(staging / MODEL_CARD, card)
        write_json(staging / METRICS, ckpt["metrics"])
    target = Path(repository) / name / version
    write_model_config(target.parent, card)
    log.info("exported %s (%s) to %s: %s", name, arch_name, target, card["verification"])
    return target


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
