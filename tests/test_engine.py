"""The continuous-batching engine, directly (`EngineCore`: scheduler, runner and update
stepped in the test's thread): a fake step model for the bookkeeping (in microseconds),
the real char_lstm for batch invariance. The scheduler alone: tests/test_scheduler.py."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from serving.core.card import StateSpec
from serving.core.models import load_model
from serving.engine import (
    EngineConfig,
    EngineCore,
    EngineObserver,
    Sequence,
    StepEngine,
    run_alone,
    text_request,
)
from serving.engine.output import TextOutput
from serving.engine.sampler import Sampler, SamplingParams, log_softmax, sample_rows
from serving.errors import DeadlineExceeded, NonFiniteOutput, ResourceExhausted

V = 8  # fake vocabulary: token 0 is EOS


class FakeStepModel:
    """h: [1, B, 1] (batch axis 1, as the exported graphs). Each token adds to h; the
    logits make (h mod (V - 1)) + 1 the greedy next token, so text never hits EOS unless
    `eos_bias` says so. A batch holding `poison` raises; `nan_token` gives NaN logits."""

    name = "fake"
    prefill_chunk = 4
    state = (StateSpec("h", "h_next", "float32", (1, -1, 1)),)
    state_axis = {"h": 1}
    eos = 0
    never_sampled: list[int] = []

    def __init__(self, prefill: bool = True, poison: int = -1, nan_token: int = -1):
        self.graphs = {"step": None, **({"prefill": None} if prefill else {})}
        self.poison, self.nan_token = poison, nan_token
        self.runs: list[tuple[str, tuple[int, ...]]] = []  # (graph, tokens shape)
        self.eos_bias = 0.0

    def zero_state(self, batch: int = 1):
        return {"h": np.zeros((1, batch, 1), np.float32)}

    def run(self, graph, tokens, state):
        self.runs.append((graph, tokens.shape))
        if (tokens == self.poison).any():
            raise RuntimeError("poisoned batch")
        h = state["h"] + tokens.sum(axis=1).astype(np.float32)[None, :, None]  # [1, B, 1]
        target = (h[0, :, 0].astype(np.int64) % (V - 1)) + 1  # [B]
        logits = -((np.arange(V)[None] - target[:, None]) ** 2).astype(np.float32)
        logits[:, 0] += self.eos_bias
        logits[(tokens == self.nan_token).any(axis=1)] = np.nan
        return logits, {"h": h}

    # The I/O-binding interface, with numpy arrays standing in for device OrtValues.
    def to_device(self, array):
        return np.array(array)

    to_host = to_device

    def run_bound(self, graph, tokens, state):
        return self.run(graph, tokens, state)


def fake_request(prompt: list[int], max_tokens: int = 5, **params) -> Sequence:
    params.setdefault("temperature", 0)
    stop = params.pop("stop", ())
    vocab = [str(i) for i in range(V)]
    return Sequence(
        pending=np.asarray(prompt, np.int64),
        sampler=Sampler(SamplingParams(**params), V),
        max_tokens=max_tokens,
        output=TextOutput(vocab, stop, params.get("min_tokens", 0)),
        prompt_tokens=len(prompt),
    )


def drain(seq: Sequence):
    delta = seq.outbox.take(timeout=0)
    return delta, [int(t) for t in delta.tokens]


def test_streams_join_at_the_next_iteration_and_leave_at_once():
    model = FakeStepModel(prefill=False)
    s = EngineCore(model, EngineConfig(max_batch_size=8))
    a = fake_request([1], max_tokens=3)
    s.submit(a)
    s.step()
    b = fake_request([2], max_tokens=5)
    s.submit(b)  # joins while a is running
    while s.has_work():
        s.step()
    assert [shape[0] for _, shape in model.runs] == [1, 2, 2, 1, 1, 1]  # a leaves after 3
    assert dict(s.stats.batch_sizes) == {1: 4, 2: 2}
    assert (s.stats.joins, s.stats.leaves) == (2, 2)
    (da, ta), (db, tb) = drain(a), drain(b)
    assert ta == [2, 4, 1] and tb == [3, 6, 5, 3, 6]  # greedy: each token adds to h
    assert da.finish_reason == db.finish_reason == "length"
    assert db.pieces == ["3", "6", "5", "3", "6"]


def test_a_finished_stream_is_out_of_the_batch_count_when_its_client_hears():
    """The live-streams gauge reads occupancy(): at the moment a stream's end is handed
    to its client, it must no longer count as running (it is dropped from the batch
    only at the end of that iteration)."""
    s = EngineCore(FakeStepModel(prefill=False), EngineConfig(max_batch_size=8))
    a, b = fake_request([1], max_tokens=2), fake_request([2], max_tokens=6)
    heard = []
    finish = a.finish

    def finish_then_look(*args, **kwargs):
        finish(*args, **kwargs)  # the client can read the end from here on
        heard.append(s.scheduler.occupancy())

    a.finish = finish_then_look
    s.submit(a)
    s.submit(b)
    while s.has_work():
        s.step()
    assert heard == [(1, 0)]  # b still runs; a is not counted


def test_max_batch_size_bounds_each_run_and_the_queue_is_bounded():
    model = FakeStepModel(prefill=False)
    s = EngineCore(model, EngineConfig(max_batch_size=2, max_queue_size=3))
    seqs = [fake_request([1], max_tokens=2) for _ in range(3)]
    for seq in seqs:
        s.submit(seq)
    with pytest.raises(ResourceExhausted, match="queued"):
        s.submit(fake_request([1]))
    assert s.stats.refused == 1
    while s.has_work():
        s.step()
    assert max(shape[0] for _, shape in model.runs) == 2
    assert all(drain(seq)[0].finish_reason == "length" for seq in seqs)


def test_a_long_prompt_is_consumed_in_chunks_between_decode_iterations():
    model = FakeStepModel()
    s = EngineCore(model, EngineConfig(prefill_tokens_per_iteration=4))
    runner = fake_request([1], max_tokens=50)
    s.submit(runner)
    s.step()  # runner: prefill of its one token, first token sampled
    long = fake_request(list(range(1, 8)) * 6, max_tokens=1)  # 42 tokens: 11 chunks of <= 4
    s.submit(long)
    before = len(drain(runner)[1])
    iterations = 0
    while s.has_work() and long.outbox.take(timeout=0) is None:
        s.step()
        iterations += 1
    assert iterations == 11
    # The running stream got a token at every one of those iterations.
    assert len(drain(runner)[1]) == iterations
    prefills = [shape for graph, shape in model.runs if graph == "prefill"]
    assert prefills[1:] == [(1, 4)] * 10 + [(1, 2)] and before == 1


def test_a_short_prompt_starts_at_once_whatever_long_prompts_fill_the_batch():
    """Issue 17 item 6: behind 248 streams of 16k-character prompts a newcomer's first
    token waited 29 s (FIFO rows, FIFO prefill). Here the batch (2 rows) and the queue
    hold 40-token prompts (10 chunks each); a 2-token prompt gets its first token at
    the next iteration, and every long prompt's text is what it is alone."""
    model = FakeStepModel()
    longs = [list(range(1, 8)) * 5 + [i + 1] * 5 for i in range(4)]  # 40 tokens each
    alone = [[int(t) for d in run_alone(model, fake_request(p)) for t in d.tokens] for p in longs]
    s = EngineCore(model, EngineConfig(max_batch_size=2, prefill_tokens_per_iteration=8))
    seqs = [fake_request(p) for p in longs]
    for seq in seqs:
        s.submit(seq)
    for _ in range(3):
        s.step()  # the first two are prefilling, two wait
    newcomer = fake_request([3, 4], max_tokens=3)
    s.submit(newcomer)
    s.step()
    first = newcomer.outbox.take(timeout=0)
    assert first is not None and len(first.tokens) == 1  # one iteration: joined, prefilled
    assert s.stats.preemptions == 1
    while s.has_work():
        s.step()
    assert [drain(seq)[1] for seq in seqs] == alone  # swapped out and back, same text
    assert len(drain(newcomer)[1]) == 2


def test_equal_chunks_are_prefilled_together_and_results_match_alone():
    model = FakeStepModel()
    prompts = [[1, 2, 3], [4, 5, 6], [1, 1]]
    alone = [[int(t) for d in run_alone(model, fake_request(p)) for t in d.tokens] for p in prompts]
    model.runs.clear()
    s = EngineCore(model)
    seqs = [fake_request(p) for p in prompts]
    for seq in seqs:
        s.submit(seq)
    while s.has_work():
        s.step()
    assert ("prefill", (2, 3)) in model.runs and ("prefill", (1, 2)) in model.runs
    assert [drain(seq)[1] for seq in seqs] == alone


@pytest.mark.parametrize("bind", [False, True])
def test_a_request_that_breaks_the_graph_fails_alone(bind):
    model = FakeStepModel(prefill=False, poison=7)
    s = EngineCore(model, EngineConfig(bind_state=bind))
    good = [fake_request([1], max_tokens=4) for _ in range(3)]
    bad = fake_request([7], max_tokens=4)
    for seq in [*good, bad]:
        s.submit(seq)
    while s.has_work():
        s.step()
    delta, _ = drain(bad)
    assert delta.finish_reason == "error" and "RuntimeError" in str(delta.error)
    assert all(drain(seq)[0].finish_reason == "length" for seq in good)
    assert s.stats.finish_reasons == {"error": 1, "length": 3}


def test_non_finite_logits_fail_that_row_alone():
    model = FakeStepModel(prefill=False, nan_token=3)
    s = EngineCore(model)
    bad, good = fake_request([3]), fake_request([1])
    s.submit(bad)
    s.submit(good)
    while s.has_work():
        s.step()
    assert isinstance(drain(bad)[0].error, NonFiniteOutput)
    assert drain(good)[0].finish_reason == "length"


def test_cancelled_and_timed_out_streams_leave_and_free_their_row():
    now = [0.0]
    model = FakeStepModel(prefill=False)
    s = EngineCore(model, EngineConfig(max_batch_size=2), clock=lambda: now[0])
    cancelled, timed, waiting = (fake_request([1], max_tokens=100) for _ in range(3))
    timed.deadline = 5.0
    for seq in (cancelled, timed, waiting):
        s.submit(seq)
    s.step()
    s.cancel(cancelled)
    now[0] = 6.0
    s.step()  # both leave; the waiting stream takes a row in the same iteration
    assert drain(cancelled)[0].finish_reason == "cancelled"
    delta, _ = drain(timed)
    assert delta.finish_reason == "deadline" and isinstance(delta.error, DeadlineExceeded)
    assert model.runs[-1] == ("step", (1, 1)) and drain(waiting)[1] == [2]
    queued = fake_request([1])
    s.submit(queued)
    s.cancel(queued)  # cancelled before it ever ran
    s.step()
    delta, tokens = drain(queued)
    assert delta.finish_reason == "cancelled" and tokens == [] and delta.completion_tokens == 0


def test_a_slow_reader_gets_every_token_since_its_last_read_in_one_delta():
    model = FakeStepModel(prefill=False)
    s = EngineCore(model)
    seq = fake_request([1], max_tokens=6)
    s.submit(seq)
    for _ in range(3):
        s.step()
    first = seq.outbox.take(timeout=0)
    assert first.tokens == [2, 4, 1] and first.pieces == ["2", "4", "1"] and not first.finished
    while s.has_work():
        s.step()
    last = seq.outbox.take(timeout=0)
    assert last.tokens == [2, 4, 1] and last.finished and last.completion_tokens == 6
    assert seq.outbox.take(timeout=0) is None


def test_min_tokens_keeps_eos_away_and_stop_strings_apply():
    model = FakeStepModel(prefill=False)
    model.eos_bias = 100.0  # EOS would win every time
    s = EngineCore(model)
    seq = fake_request([1], max_tokens=10, min_tokens=4)
    stopped = fake_request([1], max_tokens=10, stop=["41"])
    s.submit(seq)
    while s.has_work():
        s.step()
    delta, tokens = drain(seq)
    assert tokens[-1] == 0 and len(tokens) == 5 and delta.finish_reason == "eos"
    model.eos_bias = 0.0
    s.submit(stopped)
    while s.has_work():
        s.step()
    delta, tokens = drain(stopped)
    assert delta.finish_reason == "stop" and "".join(delta.pieces) == "2" and tokens == [2, 4, 1]


def test_the_engine_thread_serves_many_submitters_and_survives_a_broken_iteration():
    model = FakeStepModel(prefill=False)
    calls = itertools.count()

    class OnceBroken(EngineObserver):  # an iteration that raises past the graph run
        def first_token(self, seconds):
            if next(calls) == 0:
                raise RuntimeError("a bug in one iteration")

    engine = StepEngine(model, EngineConfig(max_batch_size=4), OnceBroken())
    first = fake_request([1])
    engine.submit(first)
    delta = first.outbox.take(timeout=5)
    assert delta.finish_reason == "error" and "RuntimeError" in str(delta.error)
    seqs = [fake_request([i % 7 + 1], max_tokens=20) for i in range(12)]
    threads = [threading.Thread(target=engine.submit, args=(seq,)) for seq in seqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = []
    for seq in seqs:
        tokens = []
        while True:
            delta = seq.outbox.take(timeout=5)
            tokens += delta.tokens
            if delta.finished:
                break
        results.append((delta.finish_reason, len(tokens)))
    engine.close()
    assert results == [("length", 20)] * 12
    sizes = engine.stats.batch_sizes
    assert max(sizes) <= 4  # how many ran together depends on thread timing; never above
    assert sum(size * runs for size, runs in sizes.items()) == 1 + 12 * 20  # one row per token


def test_batched_sampling_is_row_for_row_the_same_as_alone():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 50)).astype(np.float32) * 3
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, seed=i, repetition_penalty=r)
        for i, (t, k, p, r) in enumerate(
            itertools.product([0, 0.7, 1.3], [0, 5], [1.0, 0.8], [1.0, 1.3])
        )
    ][:16]
    alone = [Sampler(p, 50) for p in params]
    batched = [Sampler(p, 50) for p in params]
    for s in (*alone, *batched):
        s.see([1, 2, 3])
    for _ in range(20):
        one = [sample_rows(logits[i : i + 1], [s])[0][0] for i, s in enumerate(alone)]
        many, _ = sample_rows(logits, batched)
        assert list(many) == one


def test_repetition_penalty_and_logprobs():
    logits = np.log(np.array([[0.1, 0.5, 0.4]]))
    plain = Sampler(SamplingParams(temperature=0, logprobs=2), 3)
    penalised = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 3)
    penalised.see([1])
    # log(0.5) * 2 < log(0.4): the seen token loses its lead
    assert sample_rows(logits, [penalised])[0][0] == 2
    tokens, (lp,) = sample_rows(logits, [plain])
    assert tokens[0] == 1 and lp.token == 1
    assert lp.logprob == pytest.approx(np.log(0.5))
    assert [t for t, _ in lp.top] == [1, 2]
    assert [v for _, v in lp.top] == pytest.approx([np.log(0.5), np.log(0.4)])
    assert np.allclose(np.exp(log_softmax(logits)).sum(), 1)


@pytest.mark.parametrize("bind", [False, True], ids=["host-state", "bound-state"])
def test_seeded_text_is_identical_alone_and_among_63_others(repository, bind):
    lm = load_model(repository / "char_lstm" / "1", "cpu")

    def request(i: int):
        prompt = "KING.\n" * (i % 4 + 1) + "Lo" * (i % 3)
        return text_request(lm, prompt, 30, SamplingParams(temperature=0.9, top_p=0.95, seed=i))

    alone = ["".join(p for d in run_alone(lm, request(i)) for p in d.pieces) for i in range(64)]
    s = EngineCore(lm, EngineConfig(max_batch_size=64, bind_state=bind))
    seqs = []
    for i in range(64):  # joining early and late, prompts of different lengths
        seqs.append(request(i))
        s.submit(seqs[-1])
        if i % 3 == 0:
            s.step()
    while s.has_work():
        s.step()
    batched = ["".join(seq.outbox.take(timeout=0).pieces) for seq in seqs]
    assert batched == alone
    assert max(s.stats.batch_sizes) > 32  # they really ran together
    assert (s.stats.state_uploads > 0) == bind  # and the bound path really ran


def test_bound_state_stays_on_the_device_while_the_batch_is_unchanged(repository):
    """I/O binding on CPU OrtValues: once four streams run together, their state goes
    from one step's outputs to the next step's inputs with no host copy; a stream leaving
    brings it home once and the rest go up once; the text is the unbound text. Unbound,
    the host arrays a step returned are the next step's inputs the same way: no gather
    while the batch is unchanged."""
    lm = load_model(repository / "char_lstm" / "1", "cpu")
    assert EngineCore(lm).runner.bind is False  # default: bound on CUDA only
    texts = []
    for bind in (False, True):
        s = EngineCore(lm, EngineConfig(bind_state=bind))
        seqs = [
            text_request(lm, "KING.\n", 40 + 20 * (i == 0), SamplingParams(seed=i, min_tokens=60))
            for i in range(4)
        ]
        for seq in seqs:
            s.submit(seq)
        gathered, gather = [], s.runner._gather
        s.runner._gather = lambda jobs, g=gather, seen=gathered: seen.append(len(jobs)) or g(jobs)
        while any(seq.status.name != "RUNNING" for seq in seqs):
            s.step()  # the prompts, and each stream's first token
        s.step()  # the first decode run uploads the batch
        moves, gathers = (s.stats.state_uploads, s.stats.state_downloads), len(gathered)
        assert gathered[-1] == 4  # the four streams' decode batch, gathered once
        for _ in range(30):
            s.step()
        assert len(gathered) == gathers  # 30 steps, no gather
        if bind:
            assert moves == (1, 0)
            assert (s.stats.state_uploads, s.stats.state_downloads) == moves  # 30 steps, no copy
        while s.has_work():
            s.step()
        if bind:  # three left together (their length), then the fourth ran alone
            assert (s.stats.state_uploads, s.stats.state_downloads) == (2, 1)
        texts.append(["".join(seq.outbox.take(timeout=0).pieces) for seq in seqs])
    assert texts[0] == texts[1]


def test_padded_batches_run_at_full_size_and_change_nothing():
    plain, padded = FakeStepModel(), FakeStepModel()
    padded.provider = "CUDAExecutionProvider"  # pad_batches=None pads on CUDA only
    results = []
    for model in (plain, padded):
        s = EngineCore(model, EngineConfig(max_batch_size=4))
        seqs = [fake_request([1, 2]), fake_request([3], max_tokens=2)]
        for seq in seqs:
            s.submit(seq)
        while s.has_work():
            s.step()
        results.append([drain(seq)[1] for seq in seqs])
    assert EngineCore(plain).runner.pad_to == 0 and EngineCore(padded).runner.pad_to == 64
    assert results[0] == results[1]
    assert {shape[0] for _, shape in padded.runs} == {4}
    assert {shape[0] for _, shape in plain.runs} == {1, 2}


def test_an_armed_outbox_wakes_its_consumer_once_per_wait():
    wakes = []
    seq = fake_request([1])
    seq.outbox.on_ready = lambda: wakes.append(1)
    assert seq.outbox.take_or_arm() is None  # nothing yet: armed
    for token in (2, 3, 4):
        seq.outbox.put(lambda d, t=token: d.tokens.append(t))
    assert len(wakes) == 1  # three tokens, one wake-up
    assert seq.outbox.take_or_arm().tokens == [2, 3, 4]
    seq.outbox.put(lambda d: d.tokens.append(5))
    assert len(wakes) == 1  # not armed: the consumer is busy and will take it
    assert seq.outbox.take_or_arm().tokens == [5]


def test_an_iteration_wakes_each_event_loop_once_however_many_streams_turn_ready():
    """Six armed outboxes of coalescing readers on two event loops turn ready in one
    iteration: each loop is called into once, at the iteration's end, and sets all its
    readers' events. Outside an iteration, or for a reader of every token, an outbox
    wakes its reader at once, as before."""
    from serving.engine.request import Waker, batched_wakes

    class Loop:
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, fn, *args):
            self.calls.append((fn, args))

    class Event:
        done = False

        def set(self):
            self.done = True

    loops, seqs, events = [Loop(), Loop()], [fake_request([1]) for _ in range(6)], []
    for i, seq in enumerate(seqs):
        events.append(Event())
        seq.outbox.on_ready = Waker(loops[i % 2], events[-1], batch=True)
        assert seq.outbox.take_or_arm() is None  # armed
    with batched_wakes():
        for seq in seqs:
            seq.outbox.put(lambda d: d.tokens.append(2))
        assert [len(loop.calls) for loop in loops] == [0, 0]  # held to the iteration's end
    assert [len(loop.calls) for loop in loops] == [1, 1]
    for loop in loops:
        fn, args = loop.calls[0]
        fn(*args)
    assert all(e.done for e in events)
    assert seqs[0].outbox.take_or_arm().tokens == [2] and seqs[0].outbox.take_or_arm() is None
    seqs[0].outbox.put(lambda d: d.tokens.append(3))  # no iteration: at once
    assert len(loops[0].calls) == 2
    seqs[2].outbox.on_ready.batch = False  # a reader of every token: woken at once
    assert seqs[2].outbox.take_or_arm().tokens == [2] and seqs[2].outbox.take_or_arm() is None
    with batched_wakes():
        seqs[2].outbox.put(lambda d: d.tokens.append(3))
        assert len(loops[0].calls) == 3


@pytest.mark.parametrize("bind", [False, True], ids=["host-state", "bound-state"])
def test_step_requests_join_the_batch_and_reproduce_greedy_generation(repository, bind):
    """A client-driven sequence (feed a token, get logits, keep the state) run through
    the same engine, batched with a generation, gives the greedy text token for token;
    with bound state, each answer brings its state home from the device."""
    from serving.engine import step_request

    lm = load_model(repository / "char_lstm" / "1", "cpu")
    greedy = SamplingParams(temperature=0)
    want = [t for d in run_alone(lm, text_request(lm, "KING.\n", 25, greedy)) for t in d.tokens]
    s = EngineCore(lm, EngineConfig(bind_state=bind))
    company = text_request(lm, "QUEEN.\n", 100, SamplingParams(seed=1))
    s.submit(company)
    tokens, state, got = [lm.bos, *lm.encode("KING.\n")], None, []
    for _ in range(25):
        seq = step_request(lm, tokens, state)
        s.submit(seq)
        while (delta := seq.outbox.take(timeout=0)) is None:
            s.step()
        assert delta.finish_reason == "stepped" and delta.logits.shape == (len(lm.vocab),)
        # its own row, not a view that keeps the whole batch's state array alive
        for name, value in delta.state.items():
            assert value.base is None and value.shape[lm.state_axis[name]] == 1
        tokens, state = [int(np.argmax(delta.logits))], delta.state
        got.append(tokens[0])
        if tokens[0] == lm.eos:
            break
    assert got == want
    assert s.stats.batch_sizes[2] > 0  # steps ran beside the generation
    with pytest.raises(Exception, match="tokens"):
        step_request(lm, [len(lm.vocab)])


def test_beam_search_refuses_non_finite_logits():
    from beam_reference import beam_search

    model = FakeStepModel(prefill=False, nan_token=3)
    model.vocab, model.bos = [str(i) for i in range(V)], 3  # <start> = 3 gives NaN
    with pytest.raises(NonFiniteOutput):
        list(beam_search(model, model.zero_state(1), 2, 4))


def test_a_beam_search_job_with_non_finite_logits_fails_alone():
    from serving.engine import BeamSearch

    model = FakeStepModel(prefill=False, nan_token=3)
    model.vocab, model.bos = [str(i) for i in range(V)], 3  # <start> = 3 gives NaN
    core = EngineCore(model)
    job, company = BeamSearch(model, None, 2, 4), fake_request([1], max_tokens=3)
    core.submit(job)
    core.submit(company)
    while core.has_work():
        core.step()
    delta = job.outbox.take(timeout=0)
    assert delta.finish_reason == "error" and isinstance(delta.error, NonFiniteOutput)
    assert delta.beams is None and delta.pieces == []
    assert drain(company)[0].finish_reason == "length"


@pytest.mark.parametrize("bind", [False, True], ids=["host-state", "bound-state"])
def test_beam_search_jobs_in_the_batch_equal_the_beams_run_alone(bind):
    """Beam searches as jobs of the engine, beside each other and beside sampled
    streams, give what the former generator gives with the beams in a batch of their
    own: the same words at the same steps, the same beams with the same scores. The
    fake model's state (a running sum) makes every beam's logits depend on its rows."""
    from beam_reference import beam_search, run_beams

    from serving.engine import BeamSearch

    model = FakeStepModel(prefill=False)
    model.vocab, model.bos = [str(i) for i in range(V)], 3
    model.eos_bias = 6.0  # <end> within reach: some beams finish, some are cut
    cases = [(2, 4), (3, 6), (5, 3), (1, 5)]  # (beam_size, max_length)
    core = EngineCore(model, EngineConfig(max_batch_size=12, bind_state=bind))
    jobs = [BeamSearch(model, model.zero_state(1), k, n) for k, n in cases]
    company = [fake_request([i + 1], max_tokens=4 + i, min_tokens=4 + i) for i in range(3)]
    for job in [company[0], *jobs, *company[1:]]:
        core.submit(job)
    got = run_beams(core, jobs)
    for (k, n), deltas in zip(cases, got, strict=True):
        events = list(beam_search(model, model.zero_state(1), k, n))
        assert [d.pieces for d in deltas] == [e.words for e in events]
        assert deltas[-1].beams == events[-1].beams and deltas[-1].finished
        assert [d.finished for d in deltas[:-1]] == [False] * (len(deltas) - 1)
        best = events[-1].beams[0]
        assert deltas[-1].finish_reason == ("eos" if best.finished else "length")
        assert deltas[-1].completion_tokens == best.tokens
    assert {b.finished for d in got for b in d[-1].beams} == {True, False}
    assert all(drain(seq)[0].finish_reason == "length" for seq in company)
    assert max(core.stats.batch_sizes) > max(k for k, _ in cases)  # they shared the runs
    assert core.stats.finish_reasons["length"] >= 3 and core.stats.leaves == 7
    assert (core.stats.state_uploads > 0) == bind


class TableModel:
    """A decoder whose next-token probabilities depend on the last token alone (a
    first-order table), so every caption's score can be worked out by hand."""

    name, vocab, eos, bos = "table", ["<end>", "<start>", "a", "b", "c"], 0, 1
    never_sampled, state_axis = [1], {"h": 0}
    TABLE = {  # last token -> P(<end>, <start>, a, b, c)
        1: [0.0, 0.0, 0.5, 0.4, 0.1],
        2: [0.2, 0.0, 0.2, 0.2, 0.4],  # after "a": nothing likely
        3: [0.97, 0.0, 0.01, 0.01, 0.01],  # after "b": <end> almost surely
        4: [1.0, 0.0, 0.0, 0.0, 0.0],
    }

    def run(self, graph, tokens, state):
        probs = np.asarray([self.TABLE[int(t)] for t in tokens[:, -1]], np.float64)
        return np.log(np.maximum(probs, 1e-9)).astype(np.float32), state  # finite, as real


def test_beam_search_beats_greedy_where_the_likeliest_first_word_leads_nowhere():
    """Greedy takes "a" (0.5) then "c" (0.4) then <end>: mean log-probability
    (ln 0.5 + ln 0.4 + ln 1) / 3 = -0.536. "b" (0.4) then <end> (0.97) scores
    (ln 0.4 + ln 0.97) / 2 = -0.474: beam search must find it, strictly higher."""
    from beam_reference import beam_search, run_beams

    model = TableModel()
    state = {"h": np.zeros((1, 1), np.float32)}
    token, greedy, logprob = model.bos, [], 0.0
    while token != model.eos:
        logits, _ = model.run("step", np.asarray([[token]]), state)
        logits[:, model.never_sampled] = -np.inf
        token = int(np.argmax(logits[0]))
        logprob += float(log_softmax(logits)[0, token])
        greedy.append(token)
    greedy_score = logprob / len(greedy)
    assert [model.vocab[t] for t in greedy] == ["a", "c", "<end>"]
    assert greedy_score == pytest.approx((np.log(0.5) + np.log(0.4)) / 3, abs=1e-5)
    events = list(beam_search(model, state, beam_size=2, max_length=5))
    best = events[-1].beams[0]
    assert best.words == ("b",) and best.finished
    assert best.score == pytest.approx((np.log(0.4) + np.log(0.97)) / 2, abs=1e-5)
    assert best.score > greedy_score + 0.05
    assert [w for e in events for w in e.words] == ["b"]  # the streamed words: the best
    # two captions ("b", "a") finished at the second step: early stopping ends it there
    assert [b.words for b in events[-1].beams] == [("b",), ("a",)]
    # The same search as a job of the engine.
    from serving.engine import BeamSearch

    model.graphs, model.zero_state = {"step": None}, lambda batch=1: {"h": np.zeros((batch, 1))}
    job = BeamSearch(model, state, beam_size=2, max_length=5)
    core = EngineCore(model)
    core.submit(job)
    (deltas,) = run_beams(core, [job])
    assert [d.pieces for d in deltas] == [e.words for e in events] == [["b"]]
    assert deltas[-1].beams == events[-1].beams and deltas[-1].finish_reason == "eos"


def test_a_closed_engine_refuses_new_streams_as_unavailable():
    from serving.errors import Unavailable

    engine = StepEngine(FakeStepModel(prefill=False))
    engine.close()
    with pytest.raises(Unavailable):
        engine.submit(fake_request([1]))


def test_a_step_request_gets_the_graphs_logits_not_the_samplers_mask():
    """The captioner's <start> is never sampled, so the samplers see -inf there; a
    client-driven sequence step answered those masked logits (the fuzz suite found a
    KServe sequence step on the captioner returning -inf)."""
    from serving.engine import step_request

    model = FakeStepModel(prefill=False)
    model.vocab, model.never_sampled = [str(i) for i in range(V)], [1]
    s = EngineCore(model)
    company = fake_request([2], max_tokens=3)  # a sampled stream in the same batch
    seq = step_request(model, [3])
    s.submit(company), s.submit(seq)
    while (delta := seq.outbox.take(timeout=0)) is None:
        s.step()
    want, _ = model.run("step", np.asarray([[3]]), model.zero_state(1))
    assert np.array_equal(delta.logits, want[0]) and np.all(np.isfinite(delta.logits))
    while s.has_work():
        s.step()
    assert 1 not in drain(company)[1]  # the mask still holds for sampling
