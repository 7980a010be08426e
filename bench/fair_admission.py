"""What a hog costs everyone else: a newcomer's time to first token and health-check
latency while one host holds nearly every stream with maximal prompts (issue 17 item 6).

    python -m bench.fair_admission [--model-repository DIR] [--server-root DIR]

Starts `python -m serving` (from `--server-root`, default this tree, so an older tree
can be measured the same way) on a loopback port, then:
1. the hog: `--hog-streams` Generate streams on `--model` from `--hog-connections`
   connections, each prompt `--prompt-chars` characters, reading every message;
2. once they are all open, the newcomer: one Generate with a 6-character prompt from a
   connection of its own; its time to first token (and its status);
3. meanwhile `grpc.health.v1.Health/Check` every 20 ms from a third connection: p50,
   p99 and the largest.
Prints one JSON object. Every client is on this host: one client to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import harness
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
OWN = [("grpc.use_local_subchannel_pool", 1)]
TEXT = "To be, or not to be, that is the question:\n"


async def _hog(stubs, args, opened: list, done: asyncio.Event) -> None:
    prompt = (TEXT * (args.prompt_chars // len(TEXT) + 1))[: args.prompt_chars]
    request = pb.GenerateRequest(model=args.model, prompt=prompt, max_tokens=args.hog_tokens)

    async def one(i: int) -> None:
        call = stubs[i % len(stubs)].Generate(request)
        opened.append(i)
        try:
            async for _ in call:
                if done.is_set():
                    call.cancel()
                    return
        except grpc.aio.AioRpcError:
            pass

    await asyncio.gather(*(one(i) for i in range(args.hog_streams)))


async def measure(target: str, args) -> dict:
    hog_channels = [
        grpc.aio.insecure_channel(target, options=OWN) for _ in range(args.hog_connections)
    ]
    opened, done = [], asyncio.Event()
    hog = asyncio.ensure_future(
        _hog([pb_grpc.InferenceStub(c) for c in hog_channels], args, opened, done)
    )
    while len(opened) < args.hog_streams:
        await asyncio.sleep(0.1)
    await asyncio.sleep(args.settle_s)  # the hog's prompts are prefilling
    health_times: list[float] = []
    result: dict = {}

    async def health() -> None:
        async with grpc.aio.insecure_channel(target, options=OWN) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                start = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                health_times.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

    async def newcomer() -> None:
        async with grpc.aio.insecure_channel(target, options=OWN) as channel:
            request = pb.GenerateRequest(model=args.model, prompt="KING.\n", max_tokens=8)
            start = time.perf_counter()
            try:
                async for _ in pb_grpc.InferenceStub(channel).Generate(
                    request, timeout=args.newcomer_timeout_s
                ):
                    result["newcomer_first_token_s"] = round(time.perf_counter() - start, 3)
                    break
                result["newcomer_status"] = "OK"
            except grpc.aio.AioRpcError as exc:
                result["newcomer_status"] = exc.code().name
                result["newcomer_detail"] = (exc.details() or "")[:200]
                result["newcomer_waited_s"] = round(time.perf_counter() - start, 3)

    checker = asyncio.ensure_future(health())
    await newcomer()
    await asyncio.sleep(args.health_window_s)
    done.set()
    await checker
    hog.cancel()
    for channel in hog_channels:
        await channel.close()
    times = sorted(health_times)
    result["health_checks"] = len(times)
    if times:
        result["health_p50_ms"] = round(1000 * times[len(times) // 2], 1)
        result["health_p99_ms"] = round(1000 * times[int(len(times) * 0.99)], 1)
        result["health_max_ms"] = round(1000 * times[-1], 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--server-root", type=Path, default=ROOT)
    p.add_argument("--model", default="char_lstm")
    p.add_argument("--hog-streams", type=int, default=248)
    p.add_argument("--hog-connections", type=int, default=31)
    p.add_argument("--hog-tokens", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=16_384)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--health-window-s", type=float, default=5.0)
    p.add_argument("--newcomer-timeout-s", type=float, default=120.0)
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(args.server_root.resolve())}
    try:
        server = harness.start(
            ["--model-repository", str(args.model_repository), "--device", "cpu",
             "--no-request-log"],
            cwd=args.server_root, env=env, stop_timeout=20,
        )  # fmt: skip
    except harness.NotReady as exc:
        raise SystemExit(f"the server did not start: {exc}") from None
    with server:
        result = asyncio.run(measure(server.target, args))
        result["server_root"] = str(args.server_root)
        print(json.dumps(result, indent=2))
        return 0


if __name__ == "__main__":
    sys.exit(main())
