"""Architectures by name: adding a network is one module and one line here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arch:
    name: str
    task: str  # "classifier" or "language_model": picks the trainer and the exporter
    config_cls: type
    model_cls: type


def _registry() -> dict[str, Arch]:
    from training.char_lm import CharLMConfig, CharLSTM
    from training.lenet import LeNet5, LeNetConfig

    archs = [
        Arch("lenet5", "classifier", LeNetConfig, LeNet5),
        Arch("char_lstm", "language_model", CharLMConfig, CharLSTM),
    ]
    return {a.name: a for a in archs}


def names() -> list[str]:
    return sorted(_registry())


def get_arch(name: str) -> Arch:
    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def build_model(name: str, **config: Any):
    arch = get_arch(name)
    return arch.model_cls(arch.config_cls(**config))
