"""The baseline a user would otherwise write: the same trained PyTorch models in eager
mode behind a plain grpc servicer with the same proto, one request at a time per
thread, no batching, no ONNX.

    python -m bench.baseline_server --checkpoints checkpoints --model-repository model_repository

`Classify` decodes the image with Pillow, resizes it as the model card says and runs
the PyTorch classifier; `Generate` runs the PyTorch language model one character at
a time with its state and streams each character. (No `Caption`: not measured.)
Lives in bench/, which serving/ never imports; it needs the training install.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image

from bench.serve import add_server_flags, serve
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.core.card import ModelCard
from training.checkpoint import load_checkpoint


class Baseline(pb_grpc.InferenceServicer):
    def __init__(self, checkpoints: Path, repository: Path, names: list[str]):
        self.models, self.cards = {}, {}
        for name in names:
            _, model, _ = load_checkpoint(checkpoints / f"{name}.pt")
            self.models[name] = model.eval()
            self.cards[name] = ModelCard.read(repository / name / "1")

    def Classify(self, request, context):
        model, card = self.models.get(request.model), self.cards.get(request.model)
        if model is None or card.kind != "classifier":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r}")
        pre = card.preprocess
        image = Image.open(io.BytesIO(request.image)).convert(pre.color_mode)
        image = image.resize((pre.width, pre.height), Image.BILINEAR)
        x = np.asarray(image, np.float32) * pre.scale
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # [C, H, W]
        mean = np.asarray(pre.mean, np.float32)[:, None, None]
        x = (x - mean) / np.asarray(pre.std, np.float32)[:, None, None]
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x[None])), dim=1)[0]
        top = torch.topk(probs, request.top_k or 5)
        return pb.ClassifyResponse(
            model=request.model,
            version="1",
            classes=[
                pb.ClassProbability(index=int(i), label=card.labels[int(i)], probability=float(p))
                for p, i in zip(top.values, top.indices, strict=True)
            ],
        )

    def Generate(self, request, context):
        model, card = self.models.get(request.model), self.cards.get(request.model)
        if model is None or card.kind != "language_model":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model: {request.model!r}")
        vocab, eos = card.vocab, card.eos
        index = {ch: i for i, ch in enumerate(vocab)}
        max_tokens = request.max_tokens if request.HasField("max_tokens") else 256
        temperature = request.temperature if request.HasField("temperature") else 1.0
        generator = torch.Generator().manual_seed(request.seed)
        tokens = torch.tensor([[eos, *(index[ch] for ch in request.prompt)]])
        with torch.no_grad():
            logits, state = model(tokens, model.init_state(1))
            produced, finish = 0, "length"
            for produced in range(1, max_tokens + 1):  # noqa: B007 - reported below
                scores = logits[0, -1]
                if temperature == 0:
                    token = int(torch.argmax(scores))
                else:
                    probs = torch.softmax(scores / temperature, dim=0)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                if token == eos:
                    finish = "eos"
                    break
                yield pb.GenerateResponse(text=vocab[token])
                logits, state = model(torch.tensor([[token]]), state)
        yield pb.GenerateResponse(
            finish_reason=finish,
            prompt_tokens=len(request.prompt),
            completion_tokens=produced,
            seed=request.seed,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--models", default="lenet5,resnet18,char_lstm")
    add_server_flags(p, 8102)
    args = p.parse_args(argv)
    return serve(
        Baseline(args.checkpoints, args.model_repository, args.models.split(",")), args, "baseline"
    )


if __name__ == "__main__":
    sys.exit(main())
