"""Train a character language model with truncated backpropagation through time.

B parallel streams walk the corpus in order; the hidden state is carried from one
chunk of T characters to the next and detached, so gradients flow back at most T
steps. Adam, a warm-up then cosine learning-rate schedule, gradient clipping, and
validation on whole held-out plays. `--bf16` runs the training steps under bfloat16
autocast (about 2.4x faster for a 2x512 LSTM on CPUs with AMX); the weights, the
evaluation and the export stay float32. After training, the gradient of the loss is
traced back through time to show how far it reaches (the notes' vanishing gradients).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from training import reports
from training.char_lm import BOS_ID, EOS_ID, CharLM, CharLMConfig, build_vocab, encode
from training.checkpoint import save_checkpoint
from training.data.shakespeare import load_corpus
from training.flags import (
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from training.loop import update
from training.registry import get_arch
from training.reports import write_metrics

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=128, help="parallel streams")
    p.add_argument("--bptt", type=positive_int, default=64, help="characters per truncated chunk")
    p.add_argument("--hidden-size", type=positive_int, default=256)
    p.add_argument("--num-layers", type=positive_int, default=2)
    p.add_argument("--embed-dim", type=positive_int, default=64)
    p.add_argument("--dropout", type=fraction, default=0.0)
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the training steps (weights and evaluation stay float32)",
    )
    p.add_argument("--lr", type=positive_float, default=8e-3)
    p.add_argument("--warmup", type=non_negative_int, default=30, help="linear warm-up steps")
    p.add_argument("--clip", type=non_negative_float, default=1.0, help="gradient-norm clipping")
    p.add_argument(
        "--reset-prob",
        type=probability,
        default=0.125,
        help="chance per stream and chunk of restarting from zero state + BOS",
    )
    p.add_argument("--eval-every", type=positive_int, default=200)
    p.add_argument(
        "--eval-chars",
        type=positive_int,
        default=60_000,
        help="validation characters per interim evaluation",
    )
    p.add_argument("--text-file", type=Path, help="train on this text instead (90/10 split)")


def _stream(works: dict[str, str], vocab: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in works.values():
        ids += encode(text, vocab) + [EOS_ID]
    return torch.tensor(ids, dtype=torch.long)


def _batchify(stream: torch.Tensor, batch: int) -> torch.Tensor:
    n = stream.numel() // batch
    return stream[: n * batch].view(batch, n)  # [B, N]: B contiguous streams


@torch.no_grad()
def evaluate(model: CharLM, stream: torch.Tensor, bptt: int, batch: int = 32) -> float:
    """Mean cross-entropy in nats per character over the stream."""
    model.eval()
    data = _batchify(stream, min(batch, max(1, stream.numel() // (bptt + 1))))
    state = model.init_state(data.size(0))
    total, count = 0.0, 0
    for i in range(0, data.size(1) - 1, bptt):
        x = data[:, i : i + bptt]
        y = data[:, i + 1 : i + 1 + bptt]
        x = x[:, : y.size(1)]
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def sample(model: CharLM, length: int, temperature: float, seed: int) -> str:
    """Text sampled as serving samples it: zero state, BOS, then one character a step."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    token, state, out = torch.tensor([[BOS_ID]]), model.init_state(1), []
    for _ in range(length):
        logits, state = model(token, state)
        probs = torch.softmax(logits[0, -1] / temperature, -1)
        token = torch.multinomial(probs, 1, generator=gen)[None]  # [1, 1]
        if token.item() == EOS_ID:
            break
        out.append(model.config.vocab[token.item()])
    model.train()
    return "".join(out)


def gradient_through_time(
    model: CharLM, stream: torch.Tensor, lags=(1, 5, 10, 25, 50, 100), windows: int = 32
) -> dict[str, float]:
    """How much of the loss gradient at one character reaches the input k steps back.

    The notes' vanishing-gradient argument, measured: for `windows` spans of held-out
    text, the loss at the last character is back-propagated to every embedded input;
    the result is mean |dC_t/dx_(t-k)| / mean |dC_t/dx_t| for each lag k. The state
    entering each span is carried over a warm-up prefix, as in generation.
    """
    span = max(lags) + 1
    warmup = 64
    starts = torch.linspace(0, stream.numel() - span - warmup - 2, windows).long()
    chunks = torch.stack([stream[i : i + warmup + span + 1] for i in starts.tolist()])
    model.eval()
    with torch.no_grad():
        _, state = model(chunks[:, :warmup], model.init_state(windows))
    x = model.embed(chunks[:, warmup : warmup + span]).detach().requires_grad_(True)
    y, _ = model.recur(x, state)
    loss = nn.functional.cross_entropy(model.head(y[:, -1]), chunks[:, -1], reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)  # [windows, span, E]
    model.train()
    norms = grad.norm(dim=-1).mean(0)  # [span]: norms[-1] is lag 0
    return {str(k): float(f"{(norms[-1 - k] / norms[-1]).item():.3g}") for k in lags}


def _restart_some(x: torch.Tensor, state, prob: float, gen: torch.Generator):
    """Restart a random subset of streams as serving starts generation: zero state, BOS first.

    Without this the model only ever sees carried-over state and is lost at the
    zero state a generation request starts from.
    """
    if prob <= 0:
        return x, state
    restart = torch.rand(x.size(0), generator=gen) < prob  # [B]
    keep = (~restart).to(state[0].dtype)[None, :, None]  # [1, B, 1]
    x = x.clone()
    x[restart, 0] = BOS_ID
    return x, tuple(s * keep for s in state)


def _lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _load_data(args) -> tuple[dict, dict, str]:
    if args.dry_run:
        text = "".join(
            f"KING.\nThe {w} is {w}, my lord {i}.\n\n"
            for i, w in enumerate(["crown", "sword", "night", "day"] * 40)
        )
        return {"dry": text}, {"dry_val": text[:800]}, "dry-run"
    if args.text_file:
        text = args.text_file.read_text(encoding="utf-8")
        cut = int(len(text) * 0.9)
        return {"train": text[:cut]}, {"val": text[cut:]}, str(args.text_file)
    return load_corpus()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.dry_run:
        args.steps, args.batch_size, args.bptt = 6, 4, 16
        args.hidden_size, args.embed_dim, args.eval_every, args.warmup = 32, 16, 3, 2
    train_works, val_works, source = _load_data(args)
    vocab = build_vocab([*train_works.values(), *val_works.values()])
    log.info(
        "corpus %s: %d train works (%d chars), validation %s (%d chars), vocab %d",
        source,
        len(train_works),
        sum(map(len, train_works.values())),
        ", ".join(val_works),
        sum(map(len, val_works.values())),
        len(vocab),
    )
    train_data = _batchify(_stream(train_works, vocab), args.batch_size)
    val_stream = _stream(val_works, vocab)

    config = CharLMConfig(
        **get_arch(args.arch).defaults,
        vocab=vocab,
        embed_dim=args.embed_dim,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        dropout=args.dropout,
    )
    model = CharLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = model.init_state(args.batch_size)
    pos, epoch, history = 0, 0, []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=args.arch, unit="step", disable=args.quiet)
    for step in bar:
        if pos + args.bptt + 1 > train_data.size(1):  # next epoch: restart streams
            pos, epoch, state = 0, epoch + 1, model.init_state(args.batch_size)
        x = train_data[:, pos : pos + args.bptt]  # [B, T]
        y = train_data[:, pos + 1 : pos + 1 + args.bptt]
        pos += args.bptt
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, args)
        state = tuple(s.detach() for s in state)  # truncate BPTT at the chunk boundary
        x, state = _restart_some(x, state, args.reset_prob, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, state = model(x, state)
        state = tuple(s.float() for s in state)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, len(vocab)), y.reshape(-1))
        record = {"step": step + 1, "train_loss": update(optimizer, loss, model, args.clip)}
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            record["val_loss"] = evaluate(model, val_stream[: args.eval_chars], args.bptt)
            log.info(
                "step %d: train %.3f, validation %.3f nats/char (first %d chars)",
                step + 1,
                record["train_loss"],
                record["val_loss"],
                args.eval_chars,
            )
        history.append(record)
        bar.set_postfix(
            loss=f"{loss.item():.3f}",
            **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}),
        )
    train_seconds = time.perf_counter() - start
    val_loss = evaluate(model, val_stream, args.bptt)
    history[-1]["val_loss"] = val_loss
    chars = args.steps * args.batch_size * args.bptt
    metrics = {
        "command": reports.command_line(args),
        "val_loss_nats_per_char": round(val_loss, 4),
        "val_bits_per_char": round(val_loss / math.log(2), 4),
        "train_loss": round(history[-1]["train_loss"], 4),
        "corpus": source,
        "validation_works": sorted(val_works),
        "validation_chars": int(val_stream.numel()),
        "train_chars_seen": chars,
        "epochs": round(chars / train_data.numel(), 3),
        "steps": args.steps,
        "train_seconds": round(train_seconds, 1),
        "train_chars_per_second": round(chars / train_seconds),
        "training_precision": "bfloat16 autocast" if args.bf16 else "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    log.info(
        "%s: validation %.4f nats/char (%.4f bits/char) after %d steps, %.0f s",
        args.arch,
        val_loss,
        metrics["val_bits_per_char"],
        args.steps,
        train_seconds,
    )
    metrics["gradient_through_time"] = gradient_through_time(model, val_stream)
    metrics["samples"] = [sample(model, 300, 0.8, seed) for seed in range(3)]
    save_checkpoint(args.out, args.arch, model, optimizer, args.steps, metrics)
    write_metrics(args.out.with_suffix(".metrics.json"), metrics, history)
    reports.plot_curves(args.out, history, "step", f"{args.arch}: {source}")
    reports.write_samples(args.out, metrics["samples"])
    return metrics


__all__ = ["add_arguments", "evaluate", "train"]
