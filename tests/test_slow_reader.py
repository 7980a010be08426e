"""A client that never reads: one raw HTTP/2 connection (the `h2` package) opens
`Generate` streams with an initial flow-control window of 0 and never sends
WINDOW_UPDATE, answering only SETTINGS and PING. It used to hold every stream slot
for as long as it stayed connected; now it holds at most its connection's share, and
only until the stall timeout cancels its streams."""

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

from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.client import StepwiseClient
from serving.server import ServerConfig, create_server

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # channels share none


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
        with self.lock:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                stream_id,
                [(":method", "POST"), (":scheme", "http"), (":path",
                  "/stepwise.v1.Inference/Generate"), (":authority", "localhost"),
                 ("content-type", "application/grpc"), ("te", "trailers")],
            )  # fmt: skip
            payload = request.SerializeToString()
            self.conn.send_data(
                stream_id, b"\0" + struct.pack(">I", len(payload)) + payload, end_stream=True
            )
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
    """A server with 4 stream slots, 2 per connection, a 2 s stall timeout, and a
    language model slowed to 5 ms a step (a 4000-token stream takes 20 s)."""
    config = ServerConfig(
        repository, port=0, device="cpu", max_workers=8, max_streams=4,
        max_streams_per_connection=2, stream_stall_timeout_s=2.0,
    )  # fmt: skip
    server, port = create_server(config)
    model = server.registry.models["char_lstm"]
    run = model.run
    model.run = lambda *args: (time.sleep(0.005), run(*args))[1]
    server.start()
    yield server, port
    server.stop(None)


def test_a_client_that_never_reads_cannot_lock_others_out(guarded):
    server, port = guarded
    hostile = NeverReads(port)
    request = pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=4000, seed=1)
    try:
        opened = [hostile.generate(request) for _ in range(3)]  # one over its share
        exhausted = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
        assert eventually(lambda: exhausted in hostile.statuses.values(), 10), hostile.statuses
        held = [s for s in opened if hostile.statuses.get(s) != exhausted]
        assert len(held) == 2 and eventually(lambda: server.streams.live == 2, 5)
        # Meanwhile another client streams on the slots left.
        with StepwiseClient(f"127.0.0.1:{port}", timeout=30) as other:
            assert len("".join(other.generate("KING.\n", max_tokens=20, seed=2))) == 20
            # The stall watchdog cancels the stuck streams and frees their slots; the
            # CANCELLED status waits behind the unread messages (an asyncio server cannot
            # reset one HTTP/2 stream), so the client learns it once it reads again.
            assert eventually(lambda: server.streams.stalled == 2, 10), hostile.statuses
            assert eventually(lambda: server.streams.live == 0, 5)
            # Until they end, they still count against their connection: no new ones.
            again = hostile.generate(request)
            assert eventually(lambda: hostile.statuses.get(again) == exhausted, 10)
            hostile.open_windows(held)
            assert eventually(lambda: all(s in hostile.statuses for s in held), 10), (
                hostile.statuses
            )
            assert {hostile.statuses[s] for s in held} == {"1"}  # 1: CANCELLED
        # Every slot is free again: two connections of two streams each fill all four.
        texts = []
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", OWN_CONNECTION) for _ in "ab"]
        try:
            stubs = [pb_grpc.InferenceStub(ch) for ch in channels]
            request = pb.GenerateRequest(model="char_lstm", prompt="KING.\n", max_tokens=30)
            streams = [stub.Generate(request, timeout=30) for stub in stubs for _ in "12"]
            texts = ["".join(r.text for r in s) for s in streams]
        finally:
            for ch in channels:
                ch.close()
        assert len(texts) == 4 and all(len(t) == 30 for t in texts)
    finally:
        hostile.close()


def test_stalled_streams_are_cancelled_by_the_watchdog_without_grpc():
    """The slot bookkeeping alone, with a fake clock: a message out and not taken for
    longer than the timeout cancels the stream; a reading client is never cancelled."""
    from serving.errors import ResourceExhausted
    from serving.streams import StreamSlots

    async def numbers(n: int):
        for i in range(n):
            yield i

    async def scenario():
        now = [0.0]
        slots = StreamSlots(3, 2, stall_timeout_s=5.0, clock=lambda: now[0])
        cancelled = []
        reader = slots.run(numbers(100), "conn-a", lambda: cancelled.append("reader"))
        stuck = slots.run(numbers(100), "conn-a", lambda: cancelled.append("stuck"))
        await anext(reader), await anext(stuck)
        with pytest.raises(ResourceExhausted, match="this connection already has 2 streams"):
            await anext(slots.run(numbers(3), "conn-a", lambda: None))
        other = slots.run(numbers(3), "conn-b", lambda: None)
        await anext(other)
        with pytest.raises(ResourceExhausted, match="all 3 streams are busy"):
            await anext(slots.run(numbers(3), "conn-c", lambda: None))
        await other.aclose()  # a finished stream: its slot is free at once
        for _ in range(10):  # 10 s: the reader takes a message every second, stuck never
            now[0] += 1.0
            await anext(reader)
            slots.check_stalls()
        assert cancelled == ["stuck"] and slots.stalled == 1
        with pytest.raises(ResourceExhausted, match="this connection already has 2"):
            await anext(slots.run(numbers(3), "conn-a", lambda: None))  # stuck still counts
        await stuck.aclose()  # what the transport does once the cancellation lands
        assert slots.live == 1 and (slots.admitted, slots.refused) == (3, 3)
        await anext(slots.run(numbers(3), "conn-a", lambda: None))  # conn-a has room again

    asyncio.run(scenario())
