"""GoogLeNet / Inception v1 (Szegedy et al., 2014), per the paper's layer table.

Inception modules run 1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches in parallel and
concatenate them; the 1x1 "reductions" keep the 3x3 and 5x5 convolutions cheap.
Global average pooling replaces the big fully connected layers. Two auxiliary
classifiers (after 4a and 4d) add 0.3-weighted losses in training only: `forward`
returns the main logits alone, so they are absent from the exported graph.
For small inputs the stem is a 3x3 convolution without the early stride;
convolutions use BatchNorm, as later Inception versions do.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig, conv_bn, initialize

# name: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), from the table.
TABLE = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
AUX_WEIGHT = 0.3


class Inception(nn.Module):
    def __init__(self, cin: int, n1: int, r3: int, n3: int, r5: int, n5: int, pool: int):
        super().__init__()
        self.b1 = conv_bn(cin, n1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, r3, 1), conv_bn(r3, n3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, r5, 1), conv_bn(r5, n5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool, 1))
        self.out_channels = n1 + n3 + n5 + pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, cin, H, W] -> [B, n1 + n3 + n5 + pool, H, W]
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class AuxClassifier(nn.Module):
    def __init__(self, cin: int, num_classes: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(2), conv_bn(cin, width, 1), nn.Flatten(),
            nn.Linear(width * 4, width * 2), nn.ReLU(inplace=True), nn.Dropout(0.7),
            nn.Linear(width * 2, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GoogLeNet(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.stem = nn.Sequential(
            conv_bn(config.in_channels, c(64), 3), conv_bn(c(64), c(64), 1),
            conv_bn(c(64), c(192), 3),
        )  # fmt: skip
        cin, blocks = c(192), {}
        for name, widths in TABLE.items():
            blocks[name] = Inception(cin, *(c(w) for w in widths))
            cin = blocks[name].out_channels
        self.blocks = nn.ModuleDict(blocks)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.aux1 = AuxClassifier(blocks["4a"].out_channels, config.num_classes, c(128))
        self.aux2 = AuxClassifier(blocks["4d"].out_channels, config.num_classes, c(128))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4),
            nn.Linear(cin, config.num_classes),
        )  # fmt: skip
        initialize(self, config.init)

    def _trunk(self, x: torch.Tensor, taps: list | None = None) -> torch.Tensor:
        x = self.pool(self.stem(x))  # [B, 192w, S/2, S/2]
        for name, block in self.blocks.items():
            if name in ("4a", "5a"):
                x = self.pool(x)  # the table's max-pools before 4a and 5a
            x = block(x)
            if taps is not None and name in ("4a", "4d"):
                taps.append(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._trunk(x))  # [B, K]; no auxiliary heads

    loss_weights = (1.0, AUX_WEIGHT, AUX_WEIGHT)  # of forward_train's heads

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits of the main head, then of the two auxiliary ones."""
        taps: list[torch.Tensor] = []
        main = self.head(self._trunk(x, taps))
        return main, self.aux1(taps[0]), self.aux2(taps[1])
