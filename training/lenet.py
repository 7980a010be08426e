"""LeNet-5 (LeCun et al., 1998) as laid out in the lecture notes.

Input 1x32x32 -> C1: 6@28x28 (5x5 conv) -> S2: 6@14x14 (2x2 max-pool)
-> C3: 16@10x10 (5x5 conv) -> S4: 16@5x5 -> C5: 120 (5x5 conv, i.e. fully
connected to S4) -> F6: 84 -> 10 outputs. ReLU in place of the original
scaled tanh, max-pooling in place of trainable sub-sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, initialize


class LeNet5(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.image_size != 32:
            raise ValueError(f"LeNet-5 takes 32x32 inputs, not {config.image_size}")
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(config.in_channels, 6, 5),
            nn.ReLU(),  # C1: [B, 6, 28, 28]
            nn.MaxPool2d(2),  # S2: [B, 6, 14, 14]
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),  # C3: [B, 16, 10, 10]
            nn.MaxPool2d(2),  # S4: [B, 16, 5, 5]
            nn.Conv2d(16, 120, 5),
            nn.ReLU(),  # C5: [B, 120, 1, 1]
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(120, 84),
            nn.ReLU(),  # F6: [B, 84]
            nn.Linear(84, config.num_classes),  # [B, num_classes]
        )
        initialize(self, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 32, 32] -> logits: [B, num_classes]
        return self.classifier(self.features(x))
