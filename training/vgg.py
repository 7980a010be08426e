"""VGG (Simonyan and Zisserman, 2014): configurations A, B, D and E of the paper's table.

Stacks of 3x3 convolutions, max-pooling between the five stages, then three fully
connected layers with dropout. For 32x32 and 64x64 inputs the classifier's hidden
layers are 512 wide (4096 in the paper) and the convolutions use BatchNorm (the
common `_bn` variant: deep plain VGGs do not train from scratch without it or the
paper's staged initialization).
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, conv_bn, initialize

# Convolution widths per stage; "M" is a 2x2 max-pool.
CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # A
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],  # B
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],  # D
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],  # E
}  # fmt: skip


class VGG(nn.Module):
    depth = "vgg11"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, cin = [], config.in_channels
        for v in CONFIGS[self.depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(cin, config.channels(v), 3))
                cin = config.channels(v)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))  # [B, 512w, 1, 1]
        hidden = config.channels(512)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(config.dropout),
            nn.Linear(hidden, config.num_classes),
        )  # fmt: skip
        initialize(self, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _variant(name: str) -> type[VGG]:
    return type(name.upper(), (VGG,), {"depth": name, "__doc__": f"VGG configuration {name}"})


VGG11, VGG13, VGG16, VGG19 = (_variant(n) for n in CONFIGS)
