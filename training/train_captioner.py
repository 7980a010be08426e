"""Train the captioner on generated scenes with teacher forcing.

Training scenes and the held-out evaluation scenes come from different seeds.
Evaluation decodes greedily and reports corpus BLEU-4, object recall (every shape
named with its colour) and exact-match rate.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training import reports
from training.caption_metrics import corpus_bleu, object_recall
from training.captioner import (
    END_ID,
    START_ID,
    Captioner,
    CaptionerConfig,
    build_word_vocab,
    encode_words,
)
from training.checkpoint import save_checkpoint
from training.data.scenes import make_scenes
from training.flags import non_negative_float, positive_float, positive_int
from training.loop import batches_per_epoch, shuffled_batches, update
from training.reports import write_metrics

log = logging.getLogger(__name__)
TRAIN_SEED, EVAL_SEED = 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-scenes", type=positive_int, default=8000)
    p.add_argument("--eval-scenes", type=positive_int, default=1000, help="fresh held-out scenes")
    p.add_argument("--epochs", type=positive_int, default=8)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=3e-3)
    p.add_argument("--clip", type=non_negative_float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--width", type=positive_float, default=0.5, help="encoder channel multiplier")
    p.add_argument("--hidden-size", type=positive_int, default=256)
    p.add_argument("--embed-dim", type=positive_int, default=64)


def images_to_tensor(images, config: CaptionerConfig) -> torch.Tensor:
    """PIL RGB images -> normalized [N, 3, S, S], as serving preprocesses them."""
    x = np.stack([np.asarray(im.convert("RGB"), np.float32) / 255 for im in images])
    x = (x - np.float32(config.mean)) / np.float32(config.std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _teacher_forcing_batch(captions: list[str], vocab: list[str], length: int):
    """inputs: <start> w1 .. wn <end>..., targets: w1 .. wn <end> -100... ([N, length])."""
    inputs = torch.full((len(captions), length), END_ID, dtype=torch.long)
    targets = torch.full((len(captions), length), -100, dtype=torch.long)
    for i, text in enumerate(captions):
        ids = encode_words(text, vocab)[: length - 1]
        inputs[i, : len(ids) + 1] = torch.tensor([START_ID, *ids])
        targets[i, : len(ids) + 1] = torch.tensor([*ids, END_ID])
    return inputs, targets


def evaluate(model: Captioner, scenes) -> dict:
    model.eval()
    x = images_to_tensor([im for im, _, _ in scenes], model.config)
    ids = torch.cat([model.greedy(chunk) for chunk in x.split(256)])
    model.train()
    vocab = model.config.vocab
    hyps = [[vocab[t] for t in row.tolist() if t != END_ID] for row in ids]
    refs = [c.split() for _, c, _ in scenes]
    objects = [Counter((s.colour, s.kind) for s in shapes) for _, _, shapes in scenes]
    return {
        "bleu4": round(corpus_bleu(refs, hyps), 4),
        "object_recall": round(object_recall(objects, hyps), 4),
        "exact_match": round(float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])), 4),
        "samples": [" ".join(h) for h in hyps[:8]],
    }


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.dry_run:
        args.train_scenes, args.eval_scenes, args.epochs, args.batch_size = 64, 16, 1, 16
        args.width, args.hidden_size, args.embed_dim = 0.125, 32, 16
    train_scenes = make_scenes(args.train_scenes, TRAIN_SEED)
    eval_scenes = make_scenes(args.eval_scenes, EVAL_SEED)
    vocab = build_word_vocab(c for _, c, _ in train_scenes)
    config = CaptionerConfig(vocab=vocab, width=args.width, hidden_size=args.hidden_size,
                             embed_dim=args.embed_dim)  # fmt: skip
    model = Captioner(config)
    x = images_to_tensor([im for im, _, _ in train_scenes], config)
    inputs, targets = _teacher_forcing_batch([c for _, c, _ in train_scenes], vocab,
                                             config.max_length)  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * batches_per_epoch(len(x), args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps)
    history, step = [], 0
    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=args.arch, unit="epoch", disable=args.quiet)
    for epoch in bar:
        total = 0.0
        for idx in shuffled_batches(len(x), args.batch_size, gen):
            logits = model(x[idx], inputs[idx])  # [B, T, V]
            flat_targets = targets[idx].reshape(-1)  # -100 marks padding
            loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), flat_targets)
            total += update(optimizer, loss, model, args.clip) * len(idx)
            schedule.step()
            step += 1
        history.append({"epoch": epoch + 1, "train_loss": total / len(x)})
        bar.set_postfix(loss=f"{total / len(x):.3f}")
    train_seconds = time.perf_counter() - start
    quality = evaluate(model, eval_scenes)
    metrics = {
        "command": reports.command_line(args),
        "bleu4": quality["bleu4"],
        "object_recall": quality["object_recall"],
        "exact_match": quality["exact_match"],
        "eval_scenes": len(eval_scenes),
        "train_scenes": len(train_scenes),
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sample_captions": quality["samples"],
    }
    log.info("%s: BLEU-4 %.4f, object recall %.4f, exact %.4f on %d held-out scenes, %.0f s",
             args.arch, metrics["bleu4"], metrics["object_recall"], metrics["exact_match"],
             len(eval_scenes), train_seconds)  # fmt: skip
    save_checkpoint(args.out, args.arch, model, optimizer, step, metrics)
    write_metrics(args.out.with_suffix(".metrics.json"), metrics, history)
    reports.plot_curves(args.out, history, "epoch", f"{args.arch} on scenes")
    shown = eval_scenes[: len(quality["samples"])]
    reports.plot_captions(args.out, [im for im, _, _ in shown], [c for _, c, _ in shown],
                          quality["samples"])  # fmt: skip
    return metrics
