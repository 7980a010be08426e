"""Train an image classifier of the zoo on the digits.

Mini-batch training with a choice of optimizer (SGD with momentum, AdaGrad, RMSprop,
Adam), learning-rate schedule (one-cycle, step decay, reduce-on-plateau), L2 weight
decay, He or Xavier initialization, dropout, and random shifts as augmentation.
A stratified tenth of the training split is held out for validation (and the
plateau schedule); the test split is touched once, at the end.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import distributed, reports
from training.checkpoint import save_checkpoint
from training.cnn_config import INITS
from training.data.digits import load_digits_split, validation_split
from training.flags import (
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from training.loop import batches_per_epoch, shuffled_batches, update
from training.registry import get_arch
from training.reports import write_metrics

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd", "adagrad", "rmsprop")
SCHEDULES = ("onecycle", "step", "plateau", "none")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--batch-size", type=positive_int, default=64, help="mini-batch size")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="(peak) learning rate")
    p.add_argument("--momentum", type=fraction, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", choices=SCHEDULES, default="onecycle")
    p.add_argument("--step-size", type=positive_int, default=10, help="step decay: epochs per step")
    p.add_argument("--gamma", type=positive_float, default=0.1, help="step/plateau decay factor")
    p.add_argument(
        "--patience", type=non_negative_int, default=3, help="plateau: epochs without progress"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="L2 penalty")
    p.add_argument("--init", choices=INITS, default="kaiming")
    p.add_argument("--width", type=positive_float, default=1.0, help="channel multiplier")
    p.add_argument("--dropout", type=fraction, default=0.5)
    p.add_argument(
        "--max-shift", type=non_negative_int, default=2, help="random translation, pixels"
    )
    p.add_argument(
        "--image-size", type=positive_int, default=32, help="digits are resized to this square"
    )


def check_args(args) -> None:
    """Refuse flags the network cannot work with, before any data is loaded: an image
    size is tried on a narrow copy of the network (ValueError names the flag)."""
    arch = get_arch(args.arch)
    size = args.image_size
    try:
        model = arch.model_cls(arch.config_cls(image_size=size, width=0.125)).eval()
        with torch.no_grad():
            model(torch.zeros(1, model.config.in_channels, size, size))
    except (ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise ValueError(f"--image-size {size}: {args.arch} cannot take it ({reason})") from None


def make_optimizer(name: str, params, args) -> torch.optim.Optimizer:
    wd = args.weight_decay
    if name == "sgd":
        return torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, args.lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, args.lr, weight_decay=wd)
    return torch.optim.Adam(params, args.lr, weight_decay=wd)


def make_schedule(name: str, optimizer, args, steps_per_epoch: int):
    """Return (scheduler or None, whether it steps per batch)."""
    if name == "onecycle":
        total = args.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=total), True
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.step_size, args.gamma), False
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, "min", factor=args.gamma, patience=args.patience
        ), False
    return None, False


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, filling with zeros."""
    if max_shift == 0:
        return x
    padded = nn.functional.pad(x, [max_shift] * 4)
    out = torch.empty_like(x)
    size = x.size(-1)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.size(0), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


class TrainView(nn.Module):
    """The model as training sees it: every head's logits (GoogLeNet's auxiliary ones
    too). A module of its own so DistributedDataParallel can wrap this forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.loss_weights = getattr(model, "loss_weights", (1.0,))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if hasattr(self.model, "forward_train"):
            return self.model.forward_train(x)
        return (self.model(x),)


def _loss(view: nn.Module, weights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy summed over the heads."""
    heads = view(x)
    return sum(w * nn.functional.cross_entropy(z, y) for z, w in zip(heads, weights, strict=True))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) in inference mode."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(256)])
    model.train()
    pred = logits.argmax(1)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (pred == y).float().mean().item(), pred.numpy()


def train(args) -> dict:
    rank, world = distributed.setup()
    try:
        return _train(args, rank, world)
    finally:
        distributed.teardown()


def _train(args, rank: int, world: int) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test, _ = load_digits_split(args.image_size)
    x_train, y_train, x_val, y_val = validation_split(x_train, y_train)
    if args.dry_run:
        args.epochs, args.width = 1, min(args.width, 0.125)
        x_train, y_train = x_train[:64], y_train[:64]
    mean, std = float(x_train.mean()), float(x_train.std())
    arch = get_arch(args.arch)
    config = arch.config_cls(
        mean=round(mean, 6), std=round(std, 6), width=args.width, dropout=args.dropout,
        init=args.init, image_size=args.image_size,
    )  # fmt: skip
    model = arch.model_cls(config)

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a) - config.mean) / config.std

    xt, xv, xs = norm(x_train), norm(x_val), norm(x_test)
    yt, yv, ys = (torch.from_numpy(a) for a in (y_train, y_val, y_test))
    background = float(norm(np.zeros(1, np.float32))[0])
    optimizer = make_optimizer(args.optimizer, model.parameters(), args)
    steps_per_epoch = batches_per_epoch(len(xt), args.batch_size)
    schedule, per_batch = make_schedule(args.schedule, optimizer, args, steps_per_epoch)
    view = TrainView(model)
    trainer = distributed.wrap(view, world)
    history, step = [], 0
    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=args.arch, unit="epoch", disable=args.quiet or rank > 0)
    for epoch in bar:
        total, seen = 0.0, 0  # this process' share of the epoch
        for batch in shuffled_batches(len(xt), args.batch_size, gen):
            xb = _shift(xt[batch] - background, args.max_shift, gen) + background
            mine = distributed.shard(torch.arange(len(batch)), rank, world)  # this process' part
            loss = _loss(trainer, view.loss_weights, xb[mine], yt[batch][mine])
            total += update(optimizer, loss, model) * len(mine)
            seen += len(mine)
            if per_batch:
                schedule.step()
            step += 1
        val_loss, val_acc, _ = evaluate(model, xv, yv)
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(val_loss)
        elif schedule is not None and not per_batch:
            schedule.step()
        history.append({
            "epoch": epoch + 1, "train_loss": total / seen, "val_loss": val_loss,
            "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
        })  # fmt: skip
        bar.set_postfix(loss=f"{total / seen:.3f}", val_acc=f"{val_acc:.3f}")
    train_seconds = time.perf_counter() - start
    _, acc, pred = evaluate(model, xs, ys)
    confusion = np.zeros((config.num_classes,) * 2, dtype=int)
    np.add.at(confusion, (y_test, pred), 1)
    metrics = {
        "command": reports.command_line(args),
        "test_accuracy": round(acc, 4),
        "val_accuracy": round(history[-1]["val_accuracy"], 4),
        "test_examples": len(ys),
        "train_examples": len(yt),
        "epochs": args.epochs,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "init": args.init,
        "width": args.width,
        "image_size": args.image_size,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "confusion_matrix": confusion.tolist(),
        "world_size": world,
        "replicas_identical": distributed.replicas_identical(model),
    }
    if rank > 0:
        return metrics
    log.info("%s: test accuracy %.4f on %d held-out digits, %.0f s",
             args.arch, acc, len(ys), train_seconds)  # fmt: skip
    save_checkpoint(args.out, args.arch, model, optimizer, step, metrics)
    write_metrics(args.out.with_suffix(".metrics.json"), metrics, history)
    reports.plot_curves(args.out, history, "epoch", f"{args.arch} on digits")
    reports.plot_confusion(args.out, metrics["confusion_matrix"], config.labels)
    return metrics
