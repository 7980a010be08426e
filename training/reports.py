"""Run reports next to each checkpoint: metrics, per-step history and PNG plots.

<out>.metrics.json   figures and the whole history
<out>.curves.png     loss (and accuracy) curves
<out>.confusion.png  classifiers: the test confusion matrix
<out>.samples.png    captioner: held-out scenes with their generated captions;
                     language models: sample generations (also as .samples.txt)
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def command_line(args) -> str:
    """The `python -m training` command that reproduces this run (output path aside)."""
    skip = {"arch", "out", "quiet", "dry_run"}
    parts = ["python -m training", args.arch]
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def write_metrics(path: Path, metrics: dict, history: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2) + "\n")


def _report_path(checkpoint: Path, kind: str) -> Path:
    return checkpoint.with_suffix(f".{kind}.png")


def plot_curves(checkpoint: Path, history: list[dict], x: str, title: str) -> Path:
    """Every numeric series in the history against x; losses left, accuracies right."""
    keys = sorted({k for h in history for k, v in h.items() if k != x and k != "lr"
                   and isinstance(v, (int, float))})  # fmt: skip
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    acc_ax = None
    for key in keys:
        points = [(h[x], h[key]) for h in history if key in h]
        xs, ys = zip(*points, strict=True)
        if "accuracy" in key:
            acc_ax = acc_ax or loss_ax.twinx()
            acc_ax.plot(xs, ys, "--", label=key)
            acc_ax.set_ylabel("accuracy")
        else:
            loss_ax.plot(xs, ys, label=key, marker="o" if len(xs) < 30 else None)
    loss_ax.set_xlabel(x)
    loss_ax.set_ylabel("loss (nats)")
    loss_ax.set_title(title)
    handles = [h for ax in (loss_ax, acc_ax) if ax for h in ax.get_legend_handles_labels()[0]]
    loss_ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    return _save(fig, _report_path(checkpoint, "curves"))


def plot_confusion(checkpoint: Path, matrix: list[list[int]], labels: list[str]) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    return _save(fig, _report_path(checkpoint, "confusion"))


def plot_captions(checkpoint: Path, images: list, truths: list[str], captions: list[str]) -> Path:
    fig, axes = plt.subplots(2, (len(images) + 1) // 2, figsize=(3 * ((len(images) + 1) // 2), 7))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, caption in zip(axes.flat, images, truths, captions, strict=False):
        ax.imshow(image)
        mark = "" if caption == truth else "  (truth: " + truth + ")"
        ax.set_title(_wrap(caption + mark), fontsize=8)
    return _save(fig, _report_path(checkpoint, "samples"))


def write_samples(checkpoint: Path, samples: list[str]) -> Path:
    """Sample generations as text and as a PNG page."""
    path = checkpoint.with_suffix(".samples.txt")
    path.write_text("\n\n----\n\n".join(samples) + "\n")
    lines = "\n\n".join(samples).splitlines()[:60]
    fig = plt.figure(figsize=(8, 0.18 * len(lines) + 1))
    fig.text(0.02, 0.98, "\n".join(lines), family="monospace", fontsize=8, va="top")
    _save(fig, _report_path(checkpoint, "samples"))
    return path


def _wrap(text: str, width: int = 28) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
