"""Character-level recurrent language model: embedding -> stacked LSTM -> linear head.

State is explicit: `forward(tokens, state) -> (logits, state)` and `init_state(batch)`.
That signature is what export turns into the step graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]  # (h, c), each [L, B, H]


EOS = "<eos>"  # vocabulary entry 0
EOS_ID = 0  # ends a document
BOS_ID = EOS_ID  # also opens a context: zero state, then BOS, then text


@dataclass
class CharLMConfig:
    vocab: list[str]  # vocab[0] is EOS; every other entry is one character
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        return asdict(self)


def build_vocab(texts) -> list[str]:
    return [EOS, *sorted(set().union(*map(set, texts)))]


def encode(text: str, vocab: list[str]) -> list[int]:
    index = {ch: i for i, ch in enumerate(vocab)}
    return [index[ch] for ch in text]


class CharLSTM(nn.Module):
    def __init__(self, config: CharLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.rnn = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # tokens: [B, T] int64 -> logits: [B, T, V]
        x = self.embed(tokens)  # [B, T, E]
        y, (h, c) = self.rnn(x, state)  # y: [B, T, H]; h, c: [L, B, H]
        return self.head(y), (h, c)
