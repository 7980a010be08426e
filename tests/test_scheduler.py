"""The scheduler alone: its decisions (joins, leaves, preemption, prefill chunks under
the token budget, the queue bound) with a fake model and no graph run. A test plays
the runner and the update by hand: it consumes what a plan feeds and finishes jobs."""

from __future__ import annotations

import numpy as np
import pytest

from serving.engine import BeamSearch, EngineConfig, Scheduler, Sequence, Status
from serving.engine.output import Output
from serving.engine.sampler import Sampler, SamplingParams
from serving.errors import DeadlineExceeded, ResourceExhausted


class FakeModel:
    """What the scheduler reads of a model: its name, its graphs, its prefill chunk
    (and what a beam search reads: vocabulary and special tokens)."""

    name, prefill_chunk = "fake", 4
    vocab, eos, bos, never_sampled = ["<end>", "<start>", "a"], 0, 1, [1]

    def __init__(self, prefill: bool = True):
        self.graphs = {"step": None, **({"prefill": None} if prefill else {})}


def stream(prompt: int, step_request: bool = False) -> Sequence:
    """A stream with `prompt` tokens to feed (a step request without a sampler)."""
    return Sequence(
        pending=np.ones(prompt, np.int64),
        sampler=None if step_request else Sampler(SamplingParams(seed=0)),
        max_tokens=5,
        output=Output(),
    )


def consume(plan) -> None:
    """What running the plan does to the jobs: each decode row takes one token, each
    prefill stream a chunk; a stream whose prompt is consumed runs on its next token."""
    for job in plan.decode:
        job.pending = job.pending[job.rows :]
    for length, group in plan.prefill.items():
        for seq in group:
            seq.pending = seq.pending[length:]
    for job in [*plan.decode, *(s for g in plan.prefill.values() for s in g)]:
        if not len(job.pending):
            job.status, job.pending = Status.RUNNING, np.ones(1, np.int64)


def prefill_lengths(plan) -> dict[int, int]:
    return {length: len(group) for length, group in plan.prefill.items()}


def test_jobs_join_first_come_first_served_while_the_batch_has_rows():
    s = Scheduler(FakeModel(prefill=False), EngineConfig(max_batch_size=2))
    a, b, c = stream(1), stream(1), stream(1)
    for job in (a, b, c):
        s.submit(job)
    plan = s.schedule(now=0.0)
    assert plan.decode == [a, b] and plan.prefill == {} and plan.left == []
    assert (a.status, b.status, c.status) == (Status.PREFILL, Status.PREFILL, Status.WAITING)
    assert s.occupancy() == (2, 1) and s.live == 3
    a.status = Status.FINISHED  # the update finished it
    assert s.occupancy() == (1, 1)  # out of the count before the iteration drops it
    s.drop_finished()
    assert s.schedule(now=1.0).decode == [b, c]
    assert (s.stats.joins, s.stats.iterations, a.joined, c.joined) == (3, 2, 0.0, 1.0)


def test_cancelled_and_timed_out_jobs_leave_and_their_rows_are_taken_at_once():
    s = Scheduler(FakeModel(prefill=False), EngineConfig(max_batch_size=2))
    cancelled, timed, waiting, queued = stream(1), stream(1), stream(1), stream(1)
    timed.deadline = 5.0
    for job in (cancelled, timed, waiting, queued):
        s.submit(job)
    assert s.schedule(now=0.0).decode == [cancelled, timed]
    s.cancel(cancelled)
    s.cancel(queued)  # cancelled while it waits: it never runs
    plan = s.schedule(now=6.0)
    assert [(job, reason) for job, reason, _ in plan.left] == [
        (cancelled, "cancelled"),
        (timed, "deadline"),
        (queued, "cancelled"),
    ]
    assert plan.left[0][2] is None and isinstance(plan.left[1][2], DeadlineExceeded)
    assert plan.decode == [waiting] and s.live == 1  # it took a freed row the same iteration
    assert s.stats.leaves == 0  # the update counts leaves, as it finishes them


def test_the_queue_is_bounded_and_a_refusal_is_counted():
    s = Scheduler(FakeModel(), EngineConfig(max_batch_size=1, max_queue_size=2))
    s.submit(stream(3))
    s.submit(stream(3))
    with pytest.raises(ResourceExhausted, match="0 streams running and 2 queued"):
        s.submit(stream(3))
    s.schedule(now=0.0)  # one joins: a place in the queue again
    s.submit(stream(3))
    with pytest.raises(ResourceExhausted, match="1 streams running and 2 queued"):
        s.submit(stream(3))
    assert s.stats.refused == 2 and s.live == 3


def test_prompts_go_in_chunks_the_least_left_first_while_the_token_budget_lasts():
    s = Scheduler(FakeModel(), EngineConfig(prefill_tokens_per_iteration=10))
    long, mid, short, step = stream(9), stream(6), stream(4), stream(1, step_request=True)
    for job in (long, mid, short, step):
        s.submit(job)
    plan = s.schedule(now=0.0)
    # The step request's single token goes with the decode set; the prompts by prefill:
    # short (4) and mid's first chunk (4) fit the budget of 10, long's chunk would not.
    assert plan.decode == [step] and plan.prefill == {4: [short, mid]}
    consume(plan)
    step.status = Status.FINISHED  # answered
    s.drop_finished()
    plan = s.schedule(now=1.0)
    assert plan.decode == [short] and plan.prefill == {2: [mid], 4: [long]}  # 2 + 4 <= 10
    consume(plan)
    plan = s.schedule(now=2.0)  # the decode set in the order they joined
    assert plan.decode == [mid, short] and prefill_lengths(plan) == {4: 1}
    consume(plan)
    plan = s.schedule(now=3.0)
    assert plan.decode == [mid, short] and prefill_lengths(plan) == {1: 1}


def test_one_chunk_runs_even_when_it_exceeds_the_budget():
    s = Scheduler(FakeModel(), EngineConfig(prefill_tokens_per_iteration=1))
    a, b = stream(8), stream(8)
    s.submit(a)
    s.submit(b)
    plan = s.schedule(now=0.0)
    assert plan.prefill == {4: [a]} and plan.jobs == 1


def test_a_short_prompt_swaps_out_the_longest_prefill_of_a_full_batch():
    s = Scheduler(FakeModel(), EngineConfig(max_batch_size=2, prefill_tokens_per_iteration=8))
    long1, long2 = stream(40), stream(30)
    s.submit(long1)
    s.submit(long2)
    s.schedule(now=1.0)
    close = stream(25)  # less than 4 chunks (16 tokens) shorter than long1: no swap
    s.submit(close)
    plan = s.schedule(now=2.0)
    assert s.stats.preemptions == 0 and set(plan.prefill[4]) == {long1, long2}
    short = stream(2)
    s.submit(short)
    plan = s.schedule(now=3.0)
    assert s.stats.preemptions == 1 and s.stats.joins == 3
    assert plan.prefill == {2: [short], 4: [long2]}  # long1 is out, its prompt kept
    assert long1.status is Status.WAITING and len(long1.pending) == 40
    assert s.occupancy() == (2, 2)
    short.status = Status.FINISHED
    s.drop_finished()
    plan = s.schedule(now=4.0)  # long1 waited at the head of the queue: it resumes first
    assert set(plan.prefill[4]) == {long1, long2} and s.occupancy() == (2, 1)
    assert long1.joined == 1.0 and s.stats.preemptions == 1  # close is no shorter by 16


def test_at_most_one_swap_per_iteration():
    s = Scheduler(FakeModel(), EngineConfig(max_batch_size=1))
    long, short1, short2 = stream(40), stream(2), stream(2)
    s.submit(long)
    s.schedule(now=0.0)
    s.submit(short1)
    s.submit(short2)
    plan = s.schedule(now=1.0)
    assert plan.prefill == {2: [short1]} and s.stats.preemptions == 1
    assert s.occupancy() == (1, 2)


def test_a_beam_search_reserves_its_rows_and_waits_for_them_in_turn():
    model = FakeModel(prefill=False)
    s = Scheduler(model, EngineConfig(max_batch_size=4))
    a, b = stream(1), stream(1)
    beams = BeamSearch(model, None, beam_size=3, max_length=4)
    after = stream(1)
    for job in (a, b, beams, after):
        s.submit(job)
    plan = s.schedule(now=0.0)
    assert plan.decode == [a, b] and s.occupancy() == (2, 2)  # 2 + 3 rows > 4: all wait
    a.status = Status.FINISHED
    s.drop_finished()
    plan = s.schedule(now=1.0)
    assert plan.decode == [b, beams] and beams.rows == 1  # 1 + 3 reserved; <start> alone
    assert s.occupancy() == (2, 1)
    beams.pending = np.asarray([2, 2, 2])  # three live beams
    plan = s.schedule(now=2.0)
    assert plan.decode == [b, beams] and sum(job.rows for job in plan.decode) == 4


def test_a_job_wider_than_the_batch_runs_alone():
    model = FakeModel(prefill=False)
    s = Scheduler(model, EngineConfig(max_batch_size=2))
    beams, other = BeamSearch(model, None, beam_size=5, max_length=4), stream(1)
    s.submit(beams)
    s.submit(other)
    assert s.schedule(now=0.0).decode == [beams]
    beams.status = Status.FINISHED
    s.drop_finished()
    assert s.schedule(now=1.0).decode == [other]


def test_without_a_prefill_graph_every_job_steps_and_an_empty_plan_runs_nothing():
    s = Scheduler(FakeModel(prefill=False))
    assert s.schedule(now=0.0).jobs == 0 and s.stats.iterations == 0
    a = stream(5)  # a prompt goes token by token through the step graph
    s.submit(a)
    plan = s.schedule(now=0.0)
    assert plan.decode == [a] and plan.prefill == {} and plan.jobs == 1
    assert s.clear() == [a] and not s.has_work()
