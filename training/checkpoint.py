"""Checkpoints are `{arch, config, state_dict, optimizer, step, metrics}`.

The model is rebuilt from its registered architecture and config, never unpickled:
`torch.load(weights_only=True)` refuses anything but tensors and plain data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from training.registry import get_arch


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or inconsistent."""


def save_checkpoint(
    path: Path,
    arch: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    metrics: dict,
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "arch": arch,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": step,
        "metrics": metrics,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path) -> tuple[str, nn.Module, dict]:
    """Return (arch name, model in eval mode, raw checkpoint dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {exc}") from exc
    missing = {"arch", "config", "state_dict", "step", "metrics"} - set(ckpt)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    try:
        arch = get_arch(ckpt["arch"])
        model = arch.model_cls(arch.config_cls(**ckpt["config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not rebuild: {exc}") from exc
    model.eval()
    return ckpt["arch"], model, ckpt
