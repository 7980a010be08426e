"""Acceptance figures measured through the served gRPC API, not in-process models.

    python tools/evaluate_served.py [--target HOST:PORT] [--model-repository DIR]

Without --target it starts a server on a loopback port from the repository. For
every served model, by kind:
- classifier: accuracy on all held-out digits sent as PNG at sizes other than 32x32;
- language_model: a seeded 300-character generation, twice, and whether they match;
- captioner: greedy captions of fresh held-out scenes sent as PNG: BLEU-4, object
  recall, exact match.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import loopback_config
from serving.app import create_server  # noqa: E402
from serving.client import StepwiseClient  # noqa: E402
from training.caption_metrics import corpus_bleu, object_recall  # noqa: E402
from training.data.digits import digit_to_image, load_digits_split  # noqa: E402
from training.data.scenes import make_scenes  # noqa: E402
from training.train_captioner import EVAL_SEED  # noqa: E402

SIZES = (8, 20, 28, 45, 64, 100)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def classifier(client: StepwiseClient, name: str) -> None:
    _, _, _, labels, pixels = load_digits_split()
    print(f"{name}: {len(labels)} held-out digits sent as PNG")
    for size in SIZES:
        start, correct = time.perf_counter(), 0
        for p8, label in zip(pixels, labels, strict=True):
            image = digit_to_image(p8).resize((size, size), Image.BILINEAR)
            top = client.classify(png(image), name, top_k=1).classes[0]
            correct += top.label == str(label)
        rate = len(labels) / (time.perf_counter() - start)
        print(f"  {size:>3}x{size:<3} accuracy {correct / len(labels):.4f}  ({rate:.0f} req/s)")


def language_model(client: StepwiseClient, name: str, seed: int, temperature: float) -> None:
    texts = [
        "".join(client.generate("", name, max_tokens=300, temperature=temperature, seed=seed))
        for _ in range(2)
    ]
    print(f"{name}: 300 characters, seed {seed}, temperature {temperature}; "
          f"identical on repeat: {texts[0] == texts[1]}\n")  # fmt: skip
    print(texts[0] + "\n")


def captioner(client: StepwiseClient, name: str, scenes: int) -> None:
    refs, hyps, objects = [], [], []
    start = time.perf_counter()
    for image, text, shapes in make_scenes(scenes, EVAL_SEED):
        *_, last = client.caption_stream(png(image), name)
        refs.append(text.split())
        hyps.append(last.caption.split())
        objects.append(Counter((s.colour, s.kind) for s in shapes))
    rate = scenes / (time.perf_counter() - start)
    exact = sum(h == r for h, r in zip(hyps, refs, strict=True)) / scenes
    bleu, recall = corpus_bleu(refs, hyps), object_recall(objects, hyps)
    print(f"{name}: {scenes} held-out scenes (seed {EVAL_SEED}) sent as PNG, greedy: "
          f"BLEU-4 {bleu:.4f}, object recall {recall:.4f}, exact {exact:.4f}  "
          f"({rate:.0f} captions/s)")  # fmt: skip
    for ref, hyp in list(zip(refs, hyps, strict=True))[:3]:
        print(f"  truth: {' '.join(ref)!r}\n  model: {' '.join(hyp)!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--scenes", type=int, default=1000)
    args = p.parse_args()
    server = None
    if args.target is None:
        server, port = create_server(loopback_config(args.model_repository))
        server.start()
        args.target = f"127.0.0.1:{port}"
    with StepwiseClient(args.target) as client:
        for model in client.list_models():
            if model.kind == "classifier":
                classifier(client, model.name)
            elif model.kind == "language_model":
                language_model(client, model.name, args.seed, args.temperature)
            elif model.kind == "captioner":
                captioner(client, model.name, args.scenes)
            print()
    if server is not None:
        server.stop(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
