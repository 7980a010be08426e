"""A client that never reads: one raw HTTP/2 connection (the `h2` package) opens
`Generate` streams with an initial flow-control window of 0 and never sends
WINDOW_UPDATE, answering only SETTINGS and PING. It used to hold every stream slot
for as long as it stayed connected; now it holds at most its client's share, and
only until the stall timeout cancels its streams; its streams past the share wait."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import grpc
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamEnded, StreamReset, TrailersReceived
from h2.settings import SettingCodes, Settings
from polling import eventually

from bench.harness import loopback_config
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.app import create_server
from serving.client import StepwiseClient

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels share none
# Every test client is on 127.0.0.1, one host: the server tells them apart by this
# header, as it would behind a proxy that sets it (serving/api/clients.py).
CLIENT_HEADER = "x-client"


class NeverReads:
    """A raw HTTP/2 client whose stream windows are 0 and never reopen."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.local_settings = Settings(
            client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: 0}
        )
        self.conn.initiate_connection()
        self.statuses: dict[int, str] = {}  # stream id -> grpc-status, or "reset"
        self.lock = threading.Lock()
        self._flush()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _flush(self) -> None:
        with self.lock:
            data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                # h2 acknowledges SETTINGS and PING by itself; received DATA is never
                # acknowledged, so no WINDOW_UPDATE ever leaves this client.
                events = self.conn.receive_data(data)
            for event in events:
                headers = getattr(event, "headers", None)
                if isinstance(event, (ResponseReceived, TrailersReceived)) and headers:
                    status = dict(headers).get("grpc-status")
                    if status is not None:
                        self.statuses[event.stream_id] = status
                elif isinstance(event, StreamReset):
                    self.statuses.setdefault(event.stream_id, "reset")
                elif isinstance(event, StreamEnded):
                    self.statuses.setdefault(event.stream_id, "ended")
            self._flush()

    def generate(self, request: pb.GenerateRequest) -> int:
        return self.call("/stepwise.v1.Inference/Generate", [request])

    def call(self, path: str, requests: list, end: bool = True) -> int:
        """Open a stream on `path` and send `requests` (small: they must fit the
        server's receive window), ending the request side when `end`."""
        with self.lock:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                stream_id,
                [(":method", "POST"), (":scheme", "http"), (":path", path),
                 (":authority", "localhost"), ("content-type", "application/grpc"),
                 ("te", "trailers"), (CLIENT_HEADER, "hostile")],
            )  # fmt: skip
            frames = b"".join(
                b"\0" + struct.pack(">I", len(p)) + p
                for p in (r.SerializeToString() for r in requests)
            )
            size = 16_384  # HTTP/2's smallest maximum frame: the server's SETTINGS may lag
            for at in range(0, len(frames), size):
                last = at + size >= len(frames)
                self.conn.send_data(stream_id, frames[at : at + size], end_stream=end and last)
        self._flush()
        return stream_id

    def open_windows(self, stream_ids) -> None:
        """Start reading: open the connection's and these streams' windows wide."""
        with self.lock:
            self.conn.increment_flow_control_window(1 << 24)
            for stream_id in stream_ids:
                self.conn.increment_flow_control_window(1 << 24, stream_id)
        self._flush()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def guarded(repository):
    """A server with 4 stream slots, 2 per client, a 2 s stall timeout, and a
    language model slowed to 5 ms a step (a 4000-token stream takes 20 s)."""
    config = loopback_config(
        repository, port=0, device="cpu", max_workers=8, max_streams=4,
        max_streams_per_client=2, stream_stall_timeout_s=2.0, client_id_header=CLIENT_HEADER,
    )  # fmt: skip
    server, port = create_server(config)
    model = server.registry.models["char_lstm"]
    run = model.run
    model.run = lambda *args: (time.sleep(0.005), run(*args))[1]
    server.start()
    yield server, port
    server.stop(None)


def _as(name: str) -> list[tuple[str, str]]:
    return [(CLIENT_HEADER, name)]


def test_a_client_that_never_reads_cannot_lock_others_out(guarded):
    server, port = guarded
    hostile = NeverReads(port)
    request = pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=4000, seed=1)
    try:
        opened = [hostile.generate(request) for _ in range(3)]  # one over its share: waits
        assert eventually(lambda: server.streams.live == 2 and server.streams.waiting == 1, 10)
        assert not hostile.statuses  # nothing refused
        # Meanwhile another client streams on the slots left.
        with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as other:
            text = other.stub.Generate(
                pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=20, seed=2),
                metadata=_as("other"),
            )
            assert len("".join(r.text for r in text)) == 20
            # The stall watchdog cancels the stuck streams and frees their slots; the
            # CANCELLED status waits behind the unread messages (an asyncio server cannot
            # reset one HTTP/2 stream), so the client learns it once it reads again.
            assert eventually(lambda: server.streams.stalled == 2, 10), hostile.statuses
            # Until they end, they still count against their client: its third waits on.
            assert server.streams.live == 0 and server.streams.waiting == 1
            assert server.streams.held("header:hostile") == 2
            hostile.open_windows(opened[:2])
            assert eventually(lambda: all(s in hostile.statuses for s in opened[:2]), 10), (
                hostile.statuses
            )
            assert {hostile.statuses[s] for s in opened[:2]} == {"1"}  # 1: CANCELLED
            # their shares given back, the waiting third runs (and stalls in its turn)
            assert eventually(lambda: server.streams.live == 1, 10)
            hostile.close()
            assert eventually(lambda: server.streams.live == 0 and not server.streams.waiting, 30)
        # Every slot is free again: two clients of two streams each fill all four.
        texts = []
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", OWN_CONNECTION) for _ in "ab"]
        try:
            stubs = [pb_grpc.InferenceStub(ch) for ch in channels]
            request = pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=30)
            streams = [
                stub.Generate(request, timeout=30, metadata=_as(name))
                for stub, name in zip(stubs, "ab", strict=True)
                for _ in "12"
            ]
            texts = ["".join(r.text for r in s) for s in streams]
        finally:
            for ch in channels:
                ch.close()
        assert len(texts) == 4 and all(len(t) == 30 for t in texts)
    finally:
        hostile.close()


def test_one_client_multiplexing_past_its_share_waits_and_is_never_refused(guarded):
    """Issue 17 item 7: 20 threads each calling generate() over one channel got 12
    RESOURCE_EXHAUSTED ("this connection already has 8 streams open")."""
    from concurrent.futures import ThreadPoolExecutor

    server, port = guarded  # 4 slots, 2 per client
    with StepwiseClient(f"127.0.0.1:{port}", timeout=60) as client:
        with ThreadPoolExecutor(10) as pool:
            texts = list(
                pool.map(
                    lambda i: "".join(client.generate("KING.\n", max_tokens=15, seed=i)),
                    range(10),
                )
            )
    assert all(len(t) == 15 for t in texts)
    assert server.streams.refused == 0 and server.streams.waited >= 8


def test_stalled_streams_are_cancelled_by_the_watchdog_without_grpc():
    """The slot bookkeeping alone, with a fake clock: a message out and not taken for
    longer than the timeout cancels the stream; a reading client is never cancelled;
    a client past its cap waits (never refused) until one of its streams ends."""
    from serving.api.streams import StreamSlots
    from serving.errors import ResourceExhausted

    async def numbers(n: int):
        for i in range(n):
            yield i

    async def scenario():
        now = [0.0]
        slots = StreamSlots(3, 2, stall_timeout_s=5.0, clock=lambda: now[0], max_waiting=1)
        cancelled = []
        reader = slots.run(numbers(100), "a", lambda: cancelled.append("reader"))
        stuck = slots.run(numbers(100), "a", lambda: cancelled.append("stuck"))
        await anext(reader), await anext(stuck)
        third = asyncio.ensure_future(anext(slots.run(numbers(3), "a", lambda: None)))
        await asyncio.sleep(0.01)
        assert not third.done() and slots.waiting == 1  # a's third waits: its cap is 2
        with pytest.raises(ResourceExhausted, match="wait for one, the most allowed"):
            await anext(slots.run(numbers(3), "b", lambda: None))  # 1 may wait, 1 does
        for _ in range(10):  # 10 s: the reader takes a message every second, stuck never
            now[0] += 1.0
            await anext(reader)
            slots.check_stalls()
        assert cancelled == ["stuck"] and slots.stalled == 1
        await asyncio.sleep(0.01)
        assert not third.done()  # stuck still counts against a
        await stuck.aclose()  # what the transport does once the cancellation lands
        assert await third == 0 and slots.live == 2
        assert (slots.admitted, slots.refused, slots.waited) == (3, 1, 1)

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_the_waiting_client_holding_fewest():
    """Fair admission: a hog's many waiting streams do not go first because they came
    first; the client holding the fewest streams gets the next free slot."""
    from serving.api.streams import StreamSlots

    async def forever():
        while True:
            yield 0

    async def scenario():
        slots = StreamSlots(4, stall_timeout_s=0)
        hog = [slots.run(forever(), "hog", lambda: None) for _ in range(4)]
        for stream in hog:
            await anext(stream)
        waiting = [
            asyncio.ensure_future(anext(slots.run(forever(), who, lambda: None)))
            for who in ["hog", "hog", "hog", "victim"]
        ]
        await asyncio.sleep(0.01)
        assert slots.waiting == 4 and not any(w.done() for w in waiting)
        await hog[0].aclose()
        await asyncio.sleep(0.01)
        assert [w.done() for w in waiting] == [False, False, False, True]  # the victim
        await hog[1].aclose()
        await asyncio.sleep(0.01)
        assert [w.done() for w in waiting] == [True, False, False, True]  # then in order
        assert slots.held("hog") == 3 and slots.held("victim") == 1
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert slots.waiting == 0  # a waiter whose call ends leaves no trace

    asyncio.run(scenario())
