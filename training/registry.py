"""Architectures by name: adding a network is one module and one line here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arch:
    name: str
    task: str  # classifier, language_model or captioner: picks the trainer and the exporter
    config_cls: type
    model_cls: type
    defaults: dict = field(default_factory=dict)  # config fields this name fixes


def _registry() -> dict[str, Arch]:
    from training.alexnet import AlexNet
    from training.captioner import Captioner, CaptionerConfig
    from training.char_lm import CharLM, CharLMConfig
    from training.cnn_config import ClassifierConfig as CNN
    from training.densenet import DenseNet
    from training.googlenet import GoogLeNet
    from training.lenet import LeNet5
    from training.resnet import ResNet18, ResNet34, ResNet50
    from training.seq_digits import SeqDigits
    from training.vgg import VGG11, VGG13, VGG16, VGG19

    archs = [
        Arch("lenet5", "classifier", CNN, LeNet5),
        Arch("alexnet", "classifier", CNN, AlexNet),
        Arch("vgg11", "classifier", CNN, VGG11),
        Arch("vgg13", "classifier", CNN, VGG13),
        Arch("vgg16", "classifier", CNN, VGG16),
        Arch("vgg19", "classifier", CNN, VGG19),
        Arch("googlenet", "classifier", CNN, GoogLeNet),
        Arch("resnet18", "classifier", CNN, ResNet18),
        Arch("resnet34", "classifier", CNN, ResNet34),
        Arch("resnet50", "classifier", CNN, ResNet50),
        Arch("densenet", "classifier", CNN, DenseNet),
        Arch("seq_digits", "classifier", CNN, SeqDigits),
        Arch("char_lstm", "language_model", CharLMConfig, CharLM, {"cell": "lstm"}),
        Arch("char_gru", "language_model", CharLMConfig, CharLM, {"cell": "gru"}),
        Arch("char_rnn", "language_model", CharLMConfig, CharLM, {"cell": "rnn"}),
        Arch("captioner", "captioner", CaptionerConfig, Captioner),
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
    return arch.model_cls(arch.config_cls(**{**arch.defaults, **config}))
