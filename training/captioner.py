"""Show and Tell captioner: a CNN encoder whose image embedding initializes the state
of an LSTM decoder that emits one word at a time between <start> and <end>.

The decoder is a CharLM over words, so its step graph is exactly a language
model's: `tokens` [B, 1], `h`, `c` -> `logits`, `h_next`, `c_next`. The encoder
keeps a 4x4 spatial grid before its projection: captions talk about where shapes
are ("left of", "above", left-to-right order), which global pooling would erase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from training.char_lm import CharLM, CharLMConfig
from training.cnn_config import conv_bn

END, START = "<end>", "<start>"
END_ID, START_ID = 0, 1


@dataclass
class CaptionerConfig:
    vocab: list[str]  # vocab[0] is <end>, vocab[1] is <start>, then the words
    in_channels: int = 3
    image_size: int = 64
    width: float = 0.5  # encoder channel multiplier over 32-64-128-128
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 1
    max_length: int = 16  # words, <end> included
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_dict(self) -> dict:
        return asdict(self)


def build_word_vocab(captions) -> list[str]:
    return [END, START, *sorted({w for c in captions for w in c.split()})]


def encode_words(caption: str, vocab: list[str]) -> list[int]:
    index = {w: i for i, w in enumerate(vocab)}
    return [index[w] for w in caption.split()]


class Captioner(nn.Module):
    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config

        def c(n: int) -> int:
            return max(4, round(n * config.width))

        self.encoder = nn.Sequential(
            conv_bn(config.in_channels, c(32), 3, stride=2),  # [B, 32w, S/2, S/2]
            conv_bn(c(32), c(64), 3), nn.MaxPool2d(2),  # [B, 64w, S/4, S/4]
            conv_bn(c(64), c(128), 3), nn.MaxPool2d(2),  # [B, 128w, S/8, S/8]
            conv_bn(c(128), c(128), 3), nn.AdaptiveAvgPool2d(4),  # [B, 128w, 4, 4]
            nn.Flatten(),
            nn.Linear(c(128) * 16, 2 * config.num_layers * config.hidden_size),
            nn.Tanh(),
        )  # fmt: skip
        self.decoder = CharLM(CharLMConfig(
            vocab=config.vocab, cell="lstm", embed_dim=config.embed_dim,
            hidden_size=config.hidden_size, num_layers=config.num_layers,
        ))  # fmt: skip
        self.state_names = self.decoder.state_names  # ("h", "c")

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B, C, S, S] -> the decoder's initial (h, c), each [L, B, H]."""
        z = self.encoder(images)  # [B, 2 * L * H]
        z = z.view(z.size(0), 2, self.config.num_layers, self.config.hidden_size)
        h, c = z.permute(1, 2, 0, 3)  # each [L, B, H]
        return h.contiguous(), c.contiguous()

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens [B, T] = <start> w1 .. -> logits [B, T, V]."""
        logits, _ = self.decoder(tokens, self.encode(images))
        return logits

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
        """Greedy captions as word ids [B, max_length], <end> padded."""
        max_length = max_length or self.config.max_length
        state = self.encode(images)
        token = torch.full((images.size(0), 1), START_ID, dtype=torch.long)
        out, done = [], torch.zeros(images.size(0), dtype=torch.bool)
        for _ in range(max_length):
            logits, state = self.decoder(token, state)
            scores = logits[:, -1].clone()
            scores[:, START_ID] = float("-inf")  # <start> only ever opens a caption
            token = scores.argmax(-1, keepdim=True)  # [B, 1]
            token[done] = END_ID
            done |= token[:, 0] == END_ID
            out.append(token)
        return torch.cat(out, 1)
