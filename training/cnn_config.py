"""What every image classifier in the zoo is configured by, and how it is initialized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

INITS = ("kaiming", "xavier")


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    in_channels: int = 1  # 1 for digits, 3 for scenes
    image_size: int = 32  # 32 for digits, 64 for scenes
    labels: list[str] = field(default_factory=lambda: [str(i) for i in range(10)])
    # Preprocessing that serving must repeat: pixels/255, then (x - mean) / std.
    mean: float = 0.0
    std: float = 1.0
    width: float = 1.0  # channel multiplier: 0.25 trains four times narrower
    dropout: float = 0.5
    init: str = "kaiming"  # kaiming (He) or xavier (Glorot)

    def to_dict(self) -> dict:
        return asdict(self)

    def channels(self, n: int) -> int:
        """n channels scaled by the width multiplier, at least 4."""
        return max(4, round(n * self.width))


def initialize(model: nn.Module, scheme: str) -> None:
    """He (Kaiming) or Glorot (Xavier) initialization of every conv and linear layer."""
    if scheme not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, not {scheme!r}")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, padding: int | None = None):
    """Conv -> BatchNorm -> ReLU, the unit most of the zoo is built from."""
    padding = kernel // 2 if padding is None else padding
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
