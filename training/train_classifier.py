"""Train an image classifier on the digits: Adam, mini-batches, shift augmentation."""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import save_checkpoint
from training.data.digits import load_digits_split
from training.registry import get_arch
from training.reports import write_metrics

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty")
    p.add_argument("--max-shift", type=int, default=2, help="random translation, pixels")


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with background (0)."""
    if max_shift == 0:
        return x
    padded = nn.functional.pad(x, [max_shift] * 4)
    out = torch.empty_like(x)
    size = x.size(-1)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.size(0), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    model.eval()
    pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(512)])
    model.train()
    return (pred == y).float().mean().item(), pred.numpy()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test, _ = load_digits_split()
    if args.dry_run:
        args.epochs = 1
        x_train, y_train = x_train[:128], y_train[:128]
    mean, std = float(x_train.mean()), float(x_train.std())
    arch = get_arch(args.arch)
    model = arch.model_cls(arch.config_cls(mean=round(mean, 6), std=round(std, 6)))
    norm = lambda a: (torch.from_numpy(a) - model.config.mean) / model.config.std  # noqa: E731
    xt, xv = norm(x_train), norm(x_test)
    yt, yv = torch.from_numpy(y_train), torch.from_numpy(y_test)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(xt) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )
    history, step = [], 0
    start = time.perf_counter()
    background = float(norm(np.zeros(1, np.float32))[0])
    for epoch in tqdm(range(args.epochs), desc=args.arch, unit="epoch", disable=args.quiet):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = _shift(xt[idx] - background, args.max_shift, gen) + background
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
            total += loss.item() * len(idx)
            step += 1
        acc, _ = accuracy(model, xv, yv)
        history.append({"epoch": epoch + 1, "train_loss": total / len(xt), "test_accuracy": acc})
    train_seconds = time.perf_counter() - start
    acc, pred = accuracy(model, xv, yv)
    confusion = np.zeros((10, 10), dtype=int)
    np.add.at(confusion, (y_test, pred), 1)
    metrics = {
        "test_accuracy": round(acc, 4),
        "test_examples": len(yv),
        "train_examples": len(yt),
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "confusion_matrix": confusion.tolist(),
    }
    log.info(
        "%s: test accuracy %.4f on %d held-out digits, %.0f s",
        args.arch,
        acc,
        len(yv),
        train_seconds,
    )
    save_checkpoint(args.out, args.arch, model, optimizer, step, metrics)
    write_metrics(args.out.with_suffix(".metrics.json"), metrics, history)
    return metrics
