"""The model repository, Triton-style: `<root>/<name>/<version>/model.onnx` + side-cars.

The model card, `model.json`, is `serving.core.card.ModelCard`'s to write.
A version directory is assembled in a temporary directory beside the repository
and renamed into place, so readers never see a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.core.card import ModelCard

METRICS = "metrics.json"  # training's figures, published with the graphs


@contextlib.contextmanager
def staged_version(root: Path, name: str, version: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes root/name/version."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a server running as another user
    try:
        yield staging
        target = root / name / version
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
            target.rename(trash / version)
            staging.rename(target)
            shutil.rmtree(trash)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_model_config(model_dir: Path, card: ModelCard) -> Path:
    """`<root>/<name>/config.pbtxt` (Triton's ModelConfig) for the model's graph, unless
    one is there already: an operator's edits (dynamic batching, instance groups) belong
    to the model, not to one version. Written to a temporary file and renamed into place."""
    from serving.core.model_config import CONFIG_FILE, config_for_card, to_text

    path = Path(model_dir) / CONFIG_FILE
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=model_dir)
    with os.fdopen(fd, "w") as f:
        f.write(to_text(config_for_card(card)))
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
    os.replace(tmp, path)
    return path


def link_or_copy(source: Path, target: Path) -> None:
    """The same bytes at `target`: a hard link where the filesystem allows, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
