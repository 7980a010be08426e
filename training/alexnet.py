"""AlexNet (Krizhevsky et al., 2012) scaled to 32x32 and 64x64 inputs.

Five convolutions (the first three each followed by max-pooling in the original's
spirit, here with 3x3 kernels for small images) and three fully connected layers
with dropout. Channel counts 64-192-384-256-256 and 4096-4096 hidden units, scaled
by the width multiplier.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, initialize


class AlexNet(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, c(64), 3, 1, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                   # [B, 64w, S/2, S/2]
            nn.Conv2d(c(64), c(192), 3, 1, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                   # [B, 192w, S/4, S/4]
            nn.Conv2d(c(192), c(384), 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(c(384), c(256), 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv2d(c(256), c(256), 3, 1, 1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),                                   # [B, 256w, S/8, S/8]
            nn.AdaptiveAvgPool2d(2),                           # [B, 256w, 2, 2]
        )  # fmt: skip
        hidden = c(4096)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(config.dropout), nn.Linear(c(256) * 4, hidden), nn.ReLU(inplace=True),
            nn.Dropout(config.dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, config.num_classes),             # [B, K]
        )  # fmt: skip
        initialize(self, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
