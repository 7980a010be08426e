"""What each async layer a streamed message passes through costs, per message (issue 20,
item 2), measured in process on one event loop without gRPC:

    python -m bench.stream_layers                  # 100,000 messages, best of 5

A Generate message leaves its outbox reader and passes, in the server, through:
StreamSlots.run (the stream's slot and stall watchdog, serving/api/streams.py), the
servicer's own generator (it builds the protobuf message), the `streaming` decorator
(errors to statuses, serving/api/status.py), and the call wrapper with the request log
and RPC metrics watching (serving/api/calls.py), before gRPC's own. Each row adds one
layer around the previous ones, over a source that yields one prebuilt
GenerateResponse per message after one turn of the event loop (as a real message waits
for its engine iteration, so every layer is suspended and resumed), and prints the time
per message and the layer's own share; the last column compares it with one streamed
message through gRPC on these two cores (`make bench`'s transport ceiling for streamed
messages, 9,824/s: about 102 us a message, client included).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.api.calls import Calls
from serving.api.logs import RequestLog
from serving.api.rpc_metrics import RpcMetrics
from serving.api.status import streaming
from serving.api.streams import StreamSlots
from serving.core.repository import ModelRegistry
from serving.metrics.prometheus import Metrics
from serving.metrics.statistics import Statistics

TRANSPORT_US = 1e6 / 9824  # one streamed message through gRPC here (README, make bench)
METHOD = "/stepwise.v1.Inference/Generate"
MESSAGE = pb.GenerateResponse(text="ab", completion_tokens=2)

Details = collections.namedtuple("Details", "method invocation_metadata")


class _Context:
    """What the layers ask of a gRPC servicer context."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def code(self):
        return None

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


async def _source(n: int):
    for _ in range(n):
        await asyncio.sleep(0)  # each message waits for the engine: the loop goes round
        yield MESSAGE


class _Servicer:
    """The servicer's generator over a stream of deltas (here, prebuilt messages)."""

    def __init__(self, slots: StreamSlots | None):
        self.slots = slots

    async def plain(self, request, context):
        events = request
        if self.slots is not None:
            events = self.slots.run(request, "client", lambda: None)
        async for message in events:
            yield message

    decorated = streaming(plain)


def _layers(n: int):
    """(name, an async iterator of n messages through that many layers), innermost first."""
    registry = ModelRegistry({})
    calls = Calls(RequestLog(), RpcMetrics(Metrics(registry, Statistics())))
    import grpc

    def wrapped(servicer):
        handler = grpc.unary_stream_rpc_method_handler(servicer.decorated)
        starts = [w.starter(Details(METHOD, ()), handler) for w in calls.watchers]

        def begin(request, context):
            from serving.api.calls import _All

            return _All([s(request, context) for s in starts if s is not None])

        return calls._streaming(METHOD, handler, begin).unary_stream

    slots = lambda: StreamSlots(1024, 1024, 0.0)  # noqa: E731 - no watchdog thread
    return [
        ("source alone (an async generator, one loop turn a message)", lambda: _source(n)),
        ("+ StreamSlots.run", lambda: slots().run(_source(n), "client", lambda: None)),
        ("+ the servicer's generator", lambda: _Servicer(slots()).plain(_source(n), _Context())),
        (
            "+ the streaming decorator",
            lambda: _Servicer(slots()).decorated(_source(n), _Context()),
        ),
        (
            "+ the call wrapper, log and metrics",
            lambda: wrapped(_Servicer(slots()))(_source(n), _Context()),
        ),
    ]


async def _time(make, n: int) -> float:
    start = time.perf_counter()
    count = 0
    async for _ in make():
        count += 1
    assert count == n, count
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    layers = _layers(args.messages)
    best = []

    async def measure():
        for _, make in layers:
            best.append(min([await _time(make, args.messages) for _ in range(args.repeat)]))

    asyncio.run(measure())
    print("| layers | us per message | this layer | this layer / one gRPC message |")
    print("| --- | --- | --- | --- |")
    previous = 0.0
    for (name, _), us in zip(layers, best, strict=True):
        own = us - previous
        print(f"| {name} | {us:.2f} | {own:.2f} | {own / TRANSPORT_US:.1%} |")
        previous = us
    return 0


if __name__ == "__main__":
    sys.exit(main())
