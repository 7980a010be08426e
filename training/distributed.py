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
    """True when every process holds bit for bit the parameters of rank 0 (gradients
    were synced). Every rank gets the same answer. BatchNorm running statistics are not
    compared: each rank estimates them from its own shard (DDP copies rank 0's before
    every forward), and the checkpoint keeps rank 0's."""
    if not dist.is_initialized():
        return True
    mine = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    reference = mine.clone()
    dist.broadcast(reference, src=0)
    differs = torch.tensor([float(not torch.equal(mine, reference))])
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    return differs.item() == 0


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
