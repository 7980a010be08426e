"""Python client and CLI for a stepwise server.

python -m serving.client list
python -m serving.client classify --image digit.png [--model lenet5] [--top-k 3]
python -m serving.client generate --prompt "ROMEO." --max-tokens 300 --seed 1
python -m serving.client --tls-ca ca.pem --token-file token.txt list   (TLS, bearer token)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.api.security import channel, read_token


class StepwiseClient:
    def __init__(
        self,
        target: str = "localhost:8001",
        timeout: float | None = 60.0,
        *,
        ca: Path | None = None,
        token: str | None = None,
        cert: Path | None = None,
        key: Path | None = None,
    ):
        """`ca`: TLS, trusting that PEM CA (with `cert` and `key` for mutual TLS);
        `token`: sent as `authorization: Bearer <token>` on every call."""
        self.channel = channel(target, ca=ca, token=token, cert=cert, key=key)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.timeout = timeout
        self.last: pb.GenerateResponse | None = None  # the final message of generate()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> StepwiseClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def classify(self, image: bytes, model: str = "lenet5", top_k: int = 0) -> pb.ClassifyResponse:
        return self.stub.Classify(
            pb.ClassifyRequest(model=model, image=image, top_k=top_k), timeout=self.timeout
        )

    def generate_stream(self, prompt: str, model: str = "char_lstm", **options):
        """The raw response stream (cancel it with `.cancel()`). Options: GenerateRequest fields."""
        options = {k: v for k, v in options.items() if v is not None}
        request = pb.GenerateRequest(model=model, prompt=prompt, **options)
        return self.stub.Generate(request, timeout=self.timeout)

    def caption_stream(self, image: bytes, model: str = "captioner", **options):
        """The raw response stream. Options: CaptionRequest fields."""
        options = {k: v for k, v in options.items() if v is not None}
        request = pb.CaptionRequest(model=model, image=image, **options)
        return self.stub.Caption(request, timeout=self.timeout)

    def generate(self, prompt: str, model: str = "char_lstm", **options) -> Iterator[str]:
        """Yield text pieces as they arrive; the final response is kept in `self.last`."""
        for response in self.generate_stream(prompt, model, **options):
            if response.finish_reason:
                self.last = response
            if response.text:
                yield response.text


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed must be in [0, 2**64), not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default="localhost:8001")
    p.add_argument("--tls-ca", type=Path, help="use TLS, trusting this PEM CA certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, help="client key (mutual TLS)")
    p.add_argument("--token-file", type=Path, help="a file holding the server's bearer token")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the served models")
    c = sub.add_parser("classify", help="classify an image file")
    c.add_argument("--image", type=Path, required=True)
    c.add_argument("--model", default="lenet5")
    c.add_argument("--top-k", type=int, default=3)
    cap = sub.add_parser("caption", help="stream a caption for an image file")
    cap.add_argument("--image", type=Path, required=True)
    cap.add_argument("--model", default="captioner")
    cap.add_argument("--max-length", type=int)
    cap.add_argument("--temperature", type=float)
    cap.add_argument("--seed", type=_seed)
    g = sub.add_parser("generate", help="stream generated text")
    g.add_argument("--prompt", default="")
    g.add_argument("--model", default="char_lstm")
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=_seed, help="0 to 2**64-1; unset: the server draws one")
    g.add_argument("--stop", action="append", default=[])
    args = p.parse_args(argv)

    security = dict(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    try:
        security["token"] = read_token(args.token_file, "--token-file") if args.token_file else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    timeout = None if args.command == "generate" else 60
    with StepwiseClient(args.target, timeout=timeout, **security) as client:
        try:
            if args.command == "list":
                for m in client.list_models():
                    print(f"{m.name}\tv{m.version}\t{m.kind}\t{m.execution_provider}")
            elif args.command == "caption":
                stream = client.caption_stream(
                    args.image.read_bytes(), args.model, max_length=args.max_length,
                    temperature=args.temperature, seed=args.seed,
                )  # fmt: skip
                for response in stream:
                    if response.text:
                        sys.stdout.write(response.text + " ")
                        sys.stdout.flush()
                summary = (f"[finish_reason={response.finish_reason} "
                           f"words={response.completion_tokens} seed={response.seed}]")  # fmt: skip
                print("\n" + summary, file=sys.stderr)
            elif args.command == "classify":
                response = client.classify(args.image.read_bytes(), args.model, args.top_k)
                for c in response.classes:
                    print(f"{c.label}\t{c.probability:.4f}")
            else:
                sys.stdout.write(args.prompt)
                for piece in client.generate(
                    args.prompt,
                    args.model,
                    max_tokens=args.max_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    seed=args.seed,
                    stop=args.stop,
                ):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                last = client.last
                print(
                    f"\n[finish_reason={last.finish_reason} prompt_tokens={last.prompt_tokens}"
                    f" completion_tokens={last.completion_tokens} seed={last.seed}]",
                    file=sys.stderr,
                )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
