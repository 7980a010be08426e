"""The pieces every trainer's inner loop shares."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch of mini-batch indices, in a seeded random order."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def batches_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module,
           clip: float | None = None) -> float:  # fmt: skip
    """Backpropagate, clip the gradient norm if asked, step; return the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()
