"""The transport ceiling: the stepwise.v1.Inference service answering at once, with
messages of the sizes stepwise sends, on the same grpc stack, and no model at all.

    python -m bench.echo_server --port 8101

`Classify` answers five classes; `Generate` streams `max_tokens` one-character
messages then the final one with the counts; `Caption` streams six words.
"""

from __future__ import annotations

import argparse
import sys

from bench.serve import add_server_flags, serve
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

CLASSES = pb.ClassifyResponse(
    model="echo",
    version="1",
    classes=[pb.ClassProbability(index=i, label=str(i), probability=0.2) for i in range(5)],
)
WORDS = "a red circle left of a blue square".split()


class Echo(pb_grpc.InferenceServicer):
    def Classify(self, request, context):
        return CLASSES

    def Generate(self, request, context):
        n = request.max_tokens if request.HasField("max_tokens") else 256
        for _ in range(n):
            yield pb.GenerateResponse(text="e")
        yield pb.GenerateResponse(
            finish_reason="length", prompt_tokens=len(request.prompt), completion_tokens=n, seed=1
        )

    def Caption(self, request, context):
        for word in WORDS:
            yield pb.CaptionResponse(text=word)
        yield pb.CaptionResponse(
            finish_reason="eos", caption=" ".join(WORDS), completion_tokens=len(WORDS) + 1, seed=1
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_flags(p, 8101)
    args = p.parse_args(argv)
    return serve(Echo(), args, "echo")


if __name__ == "__main__":
    sys.exit(main())
