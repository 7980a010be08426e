"""Sequential processing of non-sequential data: a many-to-one LSTM reads a digit
image one row at a time (T = 32 rows of 32 pixels) and classifies it from its
last hidden state.

It is a classifier like the CNNs (same config, trainer and Classify RPC) and is
exported as one full-sequence graph: image in, logits out.
"""

from __future__ import annotations

import torch
from torch import nn

from training.cnn_config import ClassifierConfig


class SeqDigits(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        hidden = config.channels(128)
        self.rnn = nn.LSTM(config.in_channels * config.image_size, hidden, num_layers=1,
                           batch_first=True)  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(hidden, config.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] -> rows: [B, T=H, C*W] -> logits: [B, K]
        rows = x.permute(0, 2, 1, 3).flatten(2)
        _, (h, _) = self.rnn(rows)  # h: [1, B, hidden], the state after the last row
        return self.head(h[-1])
