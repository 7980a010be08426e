"""Character-level recurrent language models: embedding -> stacked RNN -> linear head.

The recurrent layers are an LSTM, a GRU, or the notes' vanilla RNN. State is a
tuple passed explicitly: `forward(tokens, state) -> (logits, state)` and
`init_state(batch)`; `state_names` says what each entry is (`h`, `c`). That
signature is what export turns into the step graph.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.rnn_cells import ElmanRNN

State = tuple[torch.Tensor, ...]  # (h, c) for an LSTM, (h,) otherwise; each [L, B, H]
CELLS = ("lstm", "gru", "rnn")


EOS = "<eos>"  # vocabulary entry 0
EOS_ID = 0  # ends a document
BOS_ID = EOS_ID  # also opens a context: zero state, then BOS, then text


@dataclass
class CharLMConfig:
    vocab: list[str]  # vocab[0] is EOS; every other entry is one character
    cell: str = "lstm"  # lstm, gru or rnn (vanilla)
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


class CharLM(nn.Module):
    def __init__(self, config: CharLMConfig):
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {config.cell!r}")
        self.config = config
        self.state_names = ("h", "c") if config.cell == "lstm" else ("h",)
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        dropout = config.dropout if config.num_layers > 1 else 0.0
        args = (config.embed_dim, config.hidden_size, config.num_layers)
        if config.cell == "rnn":
            self.rnn = ElmanRNN(*args, dropout=dropout)
        else:
            cls = nn.LSTM if config.cell == "lstm" else nn.GRU
            self.rnn = cls(*args, dropout=dropout, batch_first=True)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        shape = (self.config.num_layers, batch, self.config.hidden_size)
        return tuple(torch.zeros(shape, device=device) for _ in self.state_names)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # tokens: [B, T] int64 -> logits: [B, T, V]; state entries: [L, B, H]
        y, state = self.recur(self.embed(tokens), state)
        return self.head(y), state

    def recur(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The recurrent layers alone: embedded inputs [B, T, E] -> outputs [B, T, H]."""
        if self.config.cell == "lstm":
            y, (h, c) = self.rnn(x, state)
            return y, (h, c)
        y, h = self.rnn(x, state[0])
        return y, (h,)

    def for_export(self) -> CharLM:
        """This model with the vanilla RNN lowered to nn.RNN (same weights, same function)."""
        if self.config.cell != "rnn":
            return self
        clone = CharLM(self.config)
        clone.load_state_dict(self.state_dict())
        clone.rnn = self.rnn.to_nn_rnn()
        return clone.eval()
