"""DenseNet (Huang et al., 2017): every layer sees the feature maps of all before it.

Dense blocks of BN-ReLU-1x1 (4k bottleneck) -> BN-ReLU-3x3 (k new channels) layers,
each concatenating its k channels to its input; transitions (BN-ReLU-1x1 with
compression 0.5, 2x2 average pooling) between blocks. DenseNet-BC with growth
rate k = 32 x width and blocks of 6, 12, 24, 16 layers (DenseNet-121), with a 3x3
stem for small inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, initialize

BLOCKS = (6, 12, 24, 16)


def _bn_relu_conv(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
    )  # fmt: skip


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.net = nn.Sequential(_bn_relu_conv(cin, 4 * growth, 1),
                                 _bn_relu_conv(4 * growth, growth, 3))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.net(x)], 1)  # [B, cin + k, H, W]


class DenseNet(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        growth = config.channels(32)
        cin = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, cin, 3, padding=1, bias=False)]
        for i, n in enumerate(BLOCKS):
            for _ in range(n):
                layers.append(DenseLayer(cin, growth))
                cin += growth
            if i < len(BLOCKS) - 1:  # transition: compress by half, halve the resolution
                layers += [_bn_relu_conv(cin, cin // 2, 1), nn.AvgPool2d(2)]
                cin //= 2
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, config.num_classes)
        )
        initialize(self, config.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
