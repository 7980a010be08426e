"""Acceptance figures measured through the served gRPC API, not in-process models.

    python tools/evaluate_served.py [--target HOST:PORT] [--model-repository DIR]

Without --target it starts a server on a loopback port from the repository.
Prints: LeNet-5 accuracy on all held-out digits sent as PNG at sizes other than
32x32, and a seeded 300-character generation, twice, with whether they match.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.client import StepwiseClient  # noqa: E402
from serving.server import ServerConfig, create_server  # noqa: E402
from training.data.digits import digit_to_image, load_digits_split  # noqa: E402

SIZES = (8, 20, 28, 45, 64, 100)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target")
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--classifier", default="lenet5")
    p.add_argument("--language-model", default="char_lstm")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    args = p.parse_args()
    server = None
    if args.target is None:
        server, port = create_server(ServerConfig(args.model_repository, port=0, device="cpu"))
        server.start()
        args.target = f"127.0.0.1:{port}"
    with StepwiseClient(args.target) as client:
        _, _, _, labels, pixels = load_digits_split()
        print(f"{args.classifier}: {len(labels)} held-out digits sent as PNG")
        for size in SIZES:
            start, correct = time.perf_counter(), 0
            for p8, label in zip(pixels, labels, strict=True):
                image = digit_to_image(p8).resize((size, size), Image.BILINEAR)
                top = client.classify(png(image), args.classifier, top_k=1).classes[0]
                correct += top.label == str(label)
            rate = len(labels) / (time.perf_counter() - start)
            print(f"  {size:>3}x{size:<3} accuracy {correct / len(labels):.4f}  ({rate:.0f} req/s)")
        texts = [
            "".join(
                client.generate(
                    "",
                    args.language_model,
                    max_tokens=300,
                    temperature=args.temperature,
                    seed=args.seed,
                )
            )
            for _ in range(2)
        ]
        print(
            f"\n{args.language_model}: 300 characters, seed {args.seed}, "
            f"temperature {args.temperature}; identical on repeat: {texts[0] == texts[1]}\n"
        )
        print(texts[0])
    if server is not None:
        server.stop(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
