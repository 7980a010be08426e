"""Data-parallel training across the processes `torchrun` starts (gloo on CPU).

    torchrun --standalone --nproc_per_node 2 -m training resnet18 [flags]

Every process builds the same model from the same seed, walks the same shuffled
order, and takes every world_size-th example of each mini-batch (so --batch-size
stays the global batch); DistributedDataParallel averages the gradients. Rank 0
alone writes the checkpoint and reports.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return int(os.environ.get("RANK", "0")), world


def wrap(module: nn.Module, world: int) -> nn.Module:
    return nn.parallel.DistributedDataParallel(module) if world > 1 else module


def shard(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return idx[rank::world]


def replicas_identical(model: nn.Module) -> bool:
    """True when every process holds exactly the same weights (gradients were synced)."""
    if not dist.is_initialized():
        return True
    mine = torch.stack([p.detach().double().sum() for p in model.parameters()])
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return all(torch.equal(mine, other) for other in everyone)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
