"""The dynamic batcher for unary calls: batches form, the queue delay is honoured,
one bad row fails alone, a full queue refuses; over the wire, batched Classify answers
what unbatched Classify answers."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from bench.harness import loopback_config
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving.app import ServerConfig, create_server
from serving.batching.dynamic import BatchingConfig, DynamicBatcher
from serving.errors import ResourceExhausted, Unavailable


class Model:
    """A fake batch function: doubles its rows, records each batch, can be held."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> list:
        self.gate.wait(10)
        self.batches.append(len(x))
        if np.any(x < 0) and len(x) > 1:
            raise RuntimeError("a negative row breaks the whole run")
        return [ValueError("zero row") if row[0] == 0 else row * 2 for row in x]


def _submit_all(batcher: DynamicBatcher, rows: list[float]) -> list:
    def one(v):
        try:
            return batcher.submit(np.asarray([v]), timeout=20)
        except Exception as exc:  # noqa: BLE001 - the row's own error is the result
            return exc

    with ThreadPoolExecutor(len(rows)) as pool:
        return list(pool.map(one, rows))


def test_queued_requests_run_as_one_batch_and_get_their_own_rows():
    model = Model()
    batcher = DynamicBatcher("fake", model, BatchingConfig(max_batch_size=8))
    model.gate.clear()  # hold the first batch so the rest queue behind it
    first = threading.Thread(target=lambda: batcher.submit(np.asarray([1.0]), timeout=20))
    first.start()
    time.sleep(0.2)
    results = []
    waiter = threading.Thread(target=lambda: results.extend(_submit_all(batcher, [2, 3, 4, 5])))
    waiter.start()
    time.sleep(0.3)  # all four queued while the model is busy
    model.gate.set()
    first.join(10)
    waiter.join(10)
    assert [float(r[0]) for r in results] == [4, 6, 8, 10]
    assert model.batches == [1, 4] and batcher.batch_sizes == {1: 1, 4: 1}


def test_the_queue_delay_is_honoured_and_a_preferred_size_runs_at_once():
    model = Model()
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=300_000)
    batcher = DynamicBatcher("fake", model, config)
    start = time.monotonic()
    batcher.submit(np.asarray([1.0]), timeout=10)
    assert time.monotonic() - start >= 0.3  # it waited for company, the whole delay
    preferred = DynamicBatcher("fake", model, BatchingConfig(
        max_batch_size=8, max_queue_delay_us=30_000_000, preferred_batch_sizes=(3,)))  # fmt: skip
    start = time.monotonic()
    assert len(_submit_all(preferred, [1, 2, 3])) == 3
    assert time.monotonic() - start < 20  # a preferred size never waits out the 30 s delay
    assert preferred.batch_sizes == {3: 1}


def test_a_bad_row_fails_alone():
    model = Model()
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=200_000)
    batcher = DynamicBatcher("fake", model, config)
    results = _submit_all(batcher, [1, 0, -1, 2])  # 0: its row errs; -1: breaks the run
    assert float(results[0][0]) == 2 and float(results[3][0]) == 4
    assert isinstance(results[1], ValueError)
    assert float(results[2][0]) == -2  # retried alone, where it runs fine
    assert 4 in model.batches  # the four were batched before the retry


def test_a_batch_that_cannot_be_delivered_fails_its_requests_and_the_batcher_goes_on():
    calls = []

    def short(x):  # one result for a batch of any size: the batch cannot be split
        calls.append(len(x))
        return [x[0] * 2]

    batcher = DynamicBatcher("short", short, BatchingConfig(max_batch_size=8,
                                                           max_queue_delay_us=200_000))  # fmt: skip
    results = _submit_all(batcher, [1, 2, 3])
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert float(batcher.submit(np.asarray([5.0]), timeout=5)[0]) == 10  # still serving


def test_a_full_queue_refuses_at_once():
    model = Model()
    batcher = DynamicBatcher("fake", model, BatchingConfig(max_batch_size=1, max_queue_size=2))
    model.gate.clear()
    running = batcher.enqueue(np.asarray([1.0]))
    deadline = time.monotonic() + 10
    while batcher.pending() and time.monotonic() < deadline:  # the thread takes it, then waits
        time.sleep(0.01)
    queued = [batcher.enqueue(np.asarray([1.0])) for _ in range(2)]  # the queue is full
    try:
        with pytest.raises(ResourceExhausted, match="2 requests are already queued"):
            batcher.submit(np.asarray([1.0]), timeout=1)
    finally:
        model.gate.set()
    assert [f.result(10)[0] for f in [running, *queued]] == [2, 2, 2]
    assert batcher.submit(np.asarray([1.0]), timeout=5)[0] == 2  # drained, serving again


def test_batched_classify_answers_what_unbatched_classify_answers(repository):
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 32, 32), np.float32) for _ in range(24)]

    def classify_all(config: ServerConfig) -> tuple[list, dict]:
        server, port = create_server(config)
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(
                    "/stepwise.v1.Inference/Classify",
                    request_serializer=pb.ClassifyRequest.SerializeToString,
                    response_deserializer=pb.ClassifyResponse.FromString,
                )

                def one(x):
                    tensor = pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=x.tobytes())
                    response = call(pb.ClassifyRequest(model="lenet5", tensor=tensor, top_k=10),
                                    timeout=30)  # fmt: skip
                    return {c.index: c.probability for c in response.classes}

                with ThreadPoolExecutor(12) as pool:
                    answers = list(pool.map(one, inputs))
            sizes = dict(server.batchers["lenet5"].batch_sizes) if server.batchers else {}
            return answers, sizes
        finally:
            server.stop(None)

    base = dict(model_repository=repository, port=0, device="cpu")
    batched, sizes = classify_all(loopback_config(**base, batching=BatchingConfig(
        max_batch_size=16, max_queue_delay_us=20_000)))  # fmt: skip
    alone, no_sizes = classify_all(
        loopback_config(**base, batching=BatchingConfig(max_batch_size=1))
    )
    assert no_sizes == {}  # batching off: no batcher at all
    assert sum(n * count for n, count in sizes.items()) == len(inputs)
    assert max(sizes) > 1  # twelve clients at once with a 20 ms window do form batches
    for a, b in zip(batched, alone, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[i] for i in range(10)], [b[i] for i in range(10)],
                                   rtol=1e-5, atol=1e-7)  # fmt: skip


def _held(max_batch_size: int):
    """A batcher whose model waits for `release`, with a first row already in it (its
    thread has taken it and waits in the model): (batcher, release, first)."""
    release = threading.Event()

    def slow(x):
        release.wait(5)
        return list(x)

    batcher = DynamicBatcher("slow", slow, BatchingConfig(max_batch_size=max_batch_size))
    first = batcher.enqueue(np.zeros(2, np.float32))
    time.sleep(0.1)
    return batcher, release, first


def test_closing_fails_queued_requests_as_unavailable():
    from serving.errors import Unavailable

    batcher, release, first = _held(max_batch_size=1)
    queued = [batcher.enqueue(np.ones(2, np.float32)) for _ in range(3)]
    batcher.close()
    release.set()
    assert first.result(5) is not None
    for future in queued:
        with pytest.raises(Unavailable):
            future.result(5)
    with pytest.raises(Unavailable):
        batcher.enqueue(np.zeros(2, np.float32))


def test_a_cancelled_request_drops_out_and_its_batch_is_answered():
    """A caller that gives up while its row is queued (a deadline, a cancelled RPC:
    asyncio cancels the wrapped future) must not fail its neighbours, nor closing."""
    batcher, release, first = _held(max_batch_size=8)  # the next rows queue behind `first`
    queued = [batcher.enqueue(np.full(2, i, np.float32)) for i in range(1, 5)]
    assert queued[0].cancel()  # its caller went away
    release.set()
    assert first.result(5) is not None
    for i, future in enumerate(queued[1:], start=2):
        assert np.array_equal(future.result(5), np.full(2, i, np.float32))
    assert sum(batcher.batch_sizes.values()) == 2 and batcher.batch_sizes[3] == 1
    release.clear()
    busy = batcher.enqueue(np.zeros(2, np.float32))
    time.sleep(0.1)  # the thread waits in the model again
    late = [batcher.enqueue(np.ones(2, np.float32)) for _ in range(2)]
    assert late[0].cancel()
    batcher.close()  # a cancelled queued request does not break closing
    release.set()
    assert busy.result(5) is not None and late[0].cancelled()
    with pytest.raises(Unavailable):
        late[1].result(5)
