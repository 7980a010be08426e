"""The data plane without gRPC: what both servicers call, driven directly."""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from polling import eventually

from serving.batching.dynamic import BatchingConfig
from serving.core.models import Classifier, LanguageModel, load_model
from serving.core.preprocess import ImageDecoder
from serving.core.repository import ModelRegistry
from serving.dataplane.deployments import Deployments
from serving.dataplane.inline import (
    INLINE_ROWS,
    INLINE_RUN_US,
    RECENT,
    LoopBudget,
    RunTimes,
    plain_png,
)
from serving.dataplane.plane import DataPlane
from serving.engine import run_alone, text_request
from serving.engine.sampler import SamplingParams
from serving.errors import Cancelled, FailedPrecondition, InvalidArgument, Unavailable
from serving.metrics.statistics import Statistics


@pytest.fixture()
def planes(repository):
    """Data planes over the test repository; `batch` 1 runs classifiers alone."""
    made = []

    def make(batch: int = 8) -> DataPlane:
        registry = ModelRegistry.load(repository, "cpu")
        deployments = Deployments(registry, Statistics(), BatchingConfig(max_batch_size=batch))
        for name, model in list(registry.models.items()):
            deployments.attach(name, model)
        workers = ThreadPoolExecutor(4)
        made.append((deployments, workers))
        return DataPlane(registry, deployments, ImageDecoder(), workers)

    yield make
    for deployments, workers in made:
        deployments.close()
        workers.shutdown()


@pytest.fixture()
def plane(planes):
    return planes()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (28, 28), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, "PNG")
    return out.getvalue()


async def _collect(stream) -> list:
    return [delta async for delta in stream]


def test_classify_batched_and_alone_agree_with_the_model(planes):
    plane, single = planes(8), planes(1)
    lenet: Classifier = plane.model("lenet5", Classifier.kind)
    x = plane.images.tensor(_png(1), lenet.preprocess)
    expected = lenet.probabilities(x[None])[0]
    assert plane.deployments.get("lenet5").batcher and not single.deployments.get("lenet5").batcher
    batched = asyncio.run(plane.classify(lenet, top_k=3, image=_png(1)))
    lenet_alone = single.model("lenet5", Classifier.kind)
    alone = asyncio.run(single.classify(lenet_alone, top_k=3, tensor=lambda: x))
    order = np.argsort(-expected, kind="stable")[:3]
    assert [i for i, _, _ in batched.classes] == list(order) == [i for i, _, _ in alone.classes]
    for (i, label, p), (_, _, q) in zip(batched.classes, alone.classes, strict=True):
        assert label == lenet.labels[i] and p == pytest.approx(expected[i], abs=1e-6)
        assert q == pytest.approx(expected[i], abs=1e-6)
    for p in (plane, single):
        stats = p.statistics["lenet5"].snapshot()
        assert stats.success.count == 1 and stats.execution_count == 1


def test_classify_refuses_what_it_cannot_run(plane):
    lenet = plane.model("lenet5", Classifier.kind)
    with pytest.raises(InvalidArgument, match="top_k: got 11; allowed 0"):
        asyncio.run(plane.classify(lenet, top_k=11, image=_png(2)))
    with pytest.raises(InvalidArgument, match="set one of image"):
        asyncio.run(plane.classify(lenet))
    huge = np.full(lenet.input.shape[1:], 1e38, np.float32)
    with pytest.raises(InvalidArgument, match="tensor.raw_data: values up to magnitude"):
        asyncio.run(plane.classify(lenet, tensor=huge))
    assert plane.statistics["lenet5"].snapshot().fail.count == 3


def test_generate_streams_what_the_engine_alone_produces(plane):
    lm: LanguageModel = plane.model("char_lstm", LanguageModel.kind)
    params = SamplingParams(0.8, seed=11)
    alone = run_alone(lm, text_request(lm, "KING", 40, params))
    expected = "".join(p for d in alone for p in d.pieces)
    deltas = asyncio.run(_collect(plane.generate(lm, "KING", 40, SamplingParams(0.8, seed=11))))
    assert "".join(p for d in deltas for p in d.pieces) == expected
    assert deltas[-1].finished and deltas[-1].completion_tokens <= 40


def test_a_cancelled_stream_ends_with_the_error_it_was_given(plane):
    lm = plane.model("char_lstm", LanguageModel.kind)
    engine = plane.deployments.get("char_lstm").engine
    stream = plane.generate(lm, "KING", 4096, SamplingParams(seed=1, min_tokens=4096))

    async def read():
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                stream.cancel(Cancelled("stalled"))
        return got

    with pytest.raises(Cancelled, match="stalled"):
        asyncio.run(read())
    # the row leaves at the engine's next iteration
    assert eventually(lambda: engine.stats.finish_reasons["cancelled"] == 1)


def test_a_stream_on_a_replaced_model_is_unavailable_and_the_old_engine_waits(plane, repository):
    lm = plane.model("char_lstm", LanguageModel.kind)
    old = plane.deployments.get("char_lstm")
    stream = plane.generate(lm, "KING", 5, SamplingParams(seed=2))
    with old.lease():
        again = load_model(repository / "char_lstm" / "1", plane.registry.sessions)
        plane.deployments.attach("char_lstm", again)
        with pytest.raises(Unavailable, match="reloaded as this request began"):
            asyncio.run(_collect(stream))
        with pytest.raises(Unavailable, match="reloaded"):
            old.lease().__enter__()  # a retired deployment takes no new lease
        assert old in plane.deployments.retiring and old.busy()  # held: not closed
    new = plane.model("char_lstm", LanguageModel.kind)
    deltas = asyncio.run(_collect(plane.generate(new, "KING", 5, SamplingParams(seed=2))))
    assert deltas[-1].finish_reason in ("length", "eos")


def test_sequence_steps_carry_state_like_the_step_graph(plane):
    lm = plane.model("char_lstm", LanguageModel.kind)
    tokens = [lm.bos, *lm.encode("KING")]

    async def steps():
        first = await plane.step(lm, "me", "'a'", np.asarray(tokens[:2]), start=True)
        second = await plane.step(lm, "me", "'a'", np.asarray(tokens[2:]), end=True)
        return first, second

    first, second = asyncio.run(steps())
    state = lm.zero_state(1)
    logits, state = lm.run("step", np.asarray([tokens[:1]]), state)
    logits, state = lm.run("step", np.asarray([tokens[1:2]]), state)
    np.testing.assert_allclose(first, logits[0], rtol=1e-5, atol=1e-6)
    for token in tokens[2:]:
        logits, state = lm.run("step", np.asarray([[token]]), state)
    np.testing.assert_allclose(second, logits[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidArgument, match="'a' does not exist"):  # ended
        asyncio.run(plane.step(lm, "me", "'a'", np.asarray(tokens[:1])))
    lenet = plane.model_version("lenet5")
    with pytest.raises(InvalidArgument, match="not a step model"):
        asyncio.run(plane.step(lenet, "me", "'b'", np.asarray([1]), start=True))


def test_infer_runs_a_graph_on_plain_tensors(plane):
    lenet = plane.model_version("lenet5")
    x = np.random.default_rng(3).normal(size=(3, *lenet.input.shape[1:])).astype(np.float32)
    (expected,) = lenet.session.run(["logits"], {lenet.input.name: x})

    async def infer():
        with plane.timed(lenet) as timing:
            return await plane.infer(lenet, {lenet.input.name: x}, ["logits"], timing)

    out = asyncio.run(infer())
    np.testing.assert_allclose(out["logits"], expected, rtol=1e-5, atol=1e-5)
    assert sum(plane.deployments.get("lenet5").batcher.batch_sizes.values()) >= 1


def test_load_and_unload_need_explicit_control(plane):
    with pytest.raises(FailedPrecondition, match="model control mode is 'none'"):
        asyncio.run(plane.load("lenet5"))
    assert plane.ready and plane.model_ready("lenet5") and not plane.model_ready("lenet5", "9")
    plane.accepting = False
    assert not plane.ready and not plane.model_ready("lenet5")


def test_one_place_counts_the_engine_the_batcher_and_the_requests(plane):
    """The engine's counters, the batcher's batch sizes and the requests' statistics are
    the model's one ModelStats: what ModelStatistics, Prometheus and tests read."""
    lm = plane.model("char_lstm", LanguageModel.kind)
    stats = plane.statistics["char_lstm"]
    assert plane.deployments.get("char_lstm").engine.stats is stats.engine
    deltas = asyncio.run(_collect(plane.generate(lm, "KING", 6, SamplingParams(seed=4))))
    assert stats.engine.leaves == 1 and stats.engine.finish_reasons[deltas[-1].finish_reason] == 1
    assert stats.engine.step_runs == sum(stats.engine.batch_sizes.values()) >= 1
    assert stats.snapshot().success.count == 1
    lenet = plane.model("lenet5", Classifier.kind)
    asyncio.run(plane.classify(lenet, image=_png(5)))
    batcher = plane.deployments.get("lenet5").batcher
    assert batcher.stats is plane.statistics["lenet5"] and batcher.batch_sizes == {1: 1}


def test_a_coalescing_reader_holds_for_the_interval_and_never_past_the_end():
    """What is there waits up to the interval for company, counted from the oldest
    token; the stream's end releases it at once (a 30 s interval would time out here)."""
    from serving.dataplane.stream import OutboxReader
    from serving.engine import Outbox

    def token(t):
        return lambda d: d.tokens.append(t)

    def end(d):
        d.finished, d.finish_reason = True, "length"

    async def run():
        outbox = Outbox()
        reader = OutboxReader(outbox)
        outbox.put(token(1))
        assert (await asyncio.wait_for(reader.next(0), 5)).tokens == [1]  # no interval
        outbox.put(token(2))
        held = asyncio.ensure_future(reader.next(30.0))
        await asyncio.sleep(0.05)
        outbox.put(token(3))
        await asyncio.sleep(0.05)
        assert not held.done()  # within the interval: held for company
        outbox.put(end)
        last = await asyncio.wait_for(held, 5)  # the end goes out at once
        assert last.tokens == [2, 3] and last.finished
        short = Outbox()
        reader = OutboxReader(short)
        short.put(token(7))
        got = await asyncio.wait_for(reader.next(0.1), 5)  # the interval ends it
        assert got.tokens == [7] and not got.finished

    asyncio.run(run())


# -- small requests on quick graphs, on the event loop (serving.dataplane.inline) ---------


def _recording(threads: list):
    def record(run):
        def wrapped(*args, **kwargs):
            threads.append(threading.current_thread())
            return run(*args, **kwargs)

        return wrapped

    return record


class _Session:
    """An ORT session whose runs say which thread made them."""

    def __init__(self, session, threads: list):
        self.session, self.run = session, _recording(threads)(session.run)


def test_run_times_call_a_graph_quick_on_its_recent_median_per_row():
    runs = RunTimes()
    for _ in range(RECENT - 1):
        runs.add(50_000)
    assert not runs.quick()  # not measured enough yet
    runs.add(50_000)
    assert runs.quick() and not runs.quick(2)  # 2 rows: a shape it has not run yet
    runs.add(100_000, rows=2)
    assert runs.quick(2) and not runs.quick(INLINE_RUN_US // 50 + 1)  # too many rows' work
    runs.add(1, rows=INLINE_ROWS + 1)  # a batch too big for the loop is not kept
    assert not runs.quick(INLINE_ROWS + 1)
    for _ in range(RECENT // 2 + 1):  # it slowed down: back to the workers
        runs.add((INLINE_RUN_US + 1) * 1000)
    assert not runs.quick()


def test_the_loop_budget_bounds_inline_work_per_window():
    budget = LoopBudget(window_s=0.05, share=0.5)
    assert budget.allows()
    budget.spend(30_000_000)  # 30 ms of a 50 ms window: past its half
    assert not budget.allows()
    time.sleep(0.06)
    assert budget.allows()  # a new window


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_plain_png_reads_the_size_and_the_chunks_without_decoding():
    plain = _png(1)
    assert plain_png(plain)
    big = io.BytesIO()
    Image.new("L", (200, 200)).save(big, "PNG")
    assert not plain_png(big.getvalue())  # more pixels than the loop takes
    # a compressed text chunk can inflate to megabytes: the pool decodes that one
    iend = plain.rindex(b"IEND") - 4
    ztxt = plain[:iend] + _chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 10_000)) + plain[iend:]
    assert Image.open(io.BytesIO(ztxt)).size == (28, 28) and not plain_png(ztxt)
    assert not plain_png(plain[:iend])  # cut short
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    assert not plain_png(jpeg.getvalue()) and not plain_png(b"\x89PNG")


def test_small_classify_on_a_quick_graph_runs_on_the_loop_the_rest_on_workers(planes, monkeypatch):
    plane = planes(batch=1)  # no dynamic batching: the worker path
    lenet = plane.model_version("lenet5")
    threads: list = []
    monkeypatch.setattr(lenet, "probabilities", _recording(threads)(lenet.probabilities))

    def classify(image: bytes, times: int) -> tuple[threading.Thread, list]:
        async def run():
            out = [(await plane.classify(lenet, image=image)).classes for _ in range(times)]
            return threading.current_thread(), out

        threads.clear()
        return asyncio.run(run())

    loop, first = classify(_png(1), RECENT)  # measured on workers first
    assert loop not in threads
    before = plane.statistics["lenet5"].snapshot()
    loop, later = classify(_png(1), 4)  # shown quick: here, and the same answer
    assert threads == [loop] * 4 and later == first[:4]
    after = plane.statistics["lenet5"].snapshot()  # counted as on a worker
    assert after.success.count - before.success.count == 4
    assert after.execution_count - before.execution_count == 4
    assert after.phases["infer"].ns > before.phases["infer"].ns
    plain = _png(2)  # an undecodable image is refused on the loop as on a worker
    broken = plain[: plain.index(b"IDAT") + 8] + b"\0" * 16 + plain[plain.index(b"IEND") - 4 :]
    with pytest.raises(InvalidArgument, match="image"):
        classify(broken, 1)
    big = io.BytesIO()
    Image.fromarray(np.zeros((200, 200), np.uint8), "L").save(big, "PNG")
    loop, _ = classify(big.getvalue(), 1)  # more pixels than the loop takes
    assert threads and loop not in threads
    slots = plane.images._slots  # every decoder busy: a worker waits for one, not the loop
    for _ in range(plane.images.limits.max_concurrent_decodes):
        slots.acquire()
    freed = threading.Timer(0.3, lambda: [slots.release() for _ in range(2)])
    freed.start()
    loop, (busy,) = classify(_png(1), 1)
    freed.join()
    assert threads and loop not in threads and busy == first[0]
    deployment = plane.deployments.get("lenet5")  # it slowed down: back to the workers
    for _ in range(RECENT):
        deployment.runs.add((INLINE_RUN_US + 50) * 1000)
    loop, _ = classify(_png(1), 1)
    assert threads and loop not in threads


def test_small_infer_on_a_quick_graph_runs_on_the_loop(planes, monkeypatch):
    plane = planes(batch=1)
    lenet = plane.model_version("lenet5")
    threads: list = []
    monkeypatch.setattr(lenet, "session", _Session(lenet.session, threads))
    rng = np.random.default_rng(5)

    def infer(rows: int, times: int):
        async def run():
            out = []
            for _ in range(times):
                x = rng.normal(size=(rows, *lenet.input.shape[1:])).astype(np.float32)
                with plane.timed(lenet) as timing:
                    got = await plane.infer(lenet, {lenet.input.name: x}, ["logits"], timing)
                out.append((x, got["logits"]))
            return threading.current_thread(), out

        threads.clear()
        return asyncio.run(run())

    loop, _ = infer(2, RECENT)
    assert loop not in threads
    loop, out = infer(2, 3)
    assert threads == [loop] * 3
    for x, logits in out:  # the same graph, the same answer
        (expected,) = lenet.session.session.run(["logits"], {lenet.input.name: x})
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    loop, _ = infer(INLINE_ROWS + 1, 1)  # a bigger batch: a worker
    assert threads and loop not in threads
