"""ResNet (He et al., 2015): residual learning, y = F(x) + x.

ResNet-18/34 stack basic blocks (two 3x3 convolutions); ResNet-50 stacks bottleneck
blocks (1x1 reduce, 3x3, 1x1 expand by 4). A 1x1 projection matches the shortcut
when the shape changes. The last BatchNorm of every residual branch starts at zero
(Goyal et al., 2017), so a deep stack starts as the identity and trains stably.
For 32x32 and 64x64 inputs the stem is one 3x3 convolution
(no 7x7 stride-2 convolution or max-pool), as in the paper's CIFAR experiments.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, conv_bn, initialize


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(
            conv_bn(cin, width, 3, stride),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
        )  # fmt: skip
        self.shortcut = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.residual = nn.Sequential(
            conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class ResNet(nn.Module):
    block: type[nn.Module] = BasicBlock
    layers: tuple[int, ...] = (2, 2, 2, 2)

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c = config.channels
        stages, cin = [conv_bn(config.in_channels, c(64), 3)], c(64)
        for i, n in enumerate(self.layers):
            width = c(64 * 2**i)
            for j in range(n):
                block = self.block(cin, width, 2 if i > 0 and j == 0 else 1)
                stages.append(block)
                cin = width * self.block.expansion
        self.features = nn.Sequential(*stages)  # [B, C, S/8, S/8]
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, config.num_classes)
        )
        initialize(self, config.init)
        for m in self.modules():  # each residual branch starts at zero: blocks start as identity
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_(m.residual[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResNet18(ResNet):
    layers = (2, 2, 2, 2)


class ResNet34(ResNet):
    layers = (3, 4, 6, 3)


class ResNet50(ResNet):
    block = Bottleneck
    layers = (3, 4, 6, 3)
