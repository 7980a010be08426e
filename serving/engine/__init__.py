"""The engine: streams as plain objects (`request`), one continuous-batching scheduler
per step model (`scheduler`), and token ids -> client text (`output`). No gRPC.

`text_request` and `caption_request` turn validated parameters into a `Sequence`;
`StepEngine.submit` adds it to the model's batch; the transport takes `Delta`s from
its outbox.
"""

from __future__ import annotations

import numpy as np

from serving.core.models import Captioner, LanguageModel
from serving.engine.output import Output, TextOutput, WordOutput
from serving.engine.request import Delta, Outbox, Sequence, Status
from serving.engine.sampler import Sampler, SamplingParams
from serving.engine.scheduler import (
    EngineConfig,
    EngineObserver,
    EngineStats,
    Scheduler,
    StepEngine,
    run_alone,
)
from serving.errors import InvalidArgument

__all__ = [
    "Delta",
    "EngineConfig",
    "EngineObserver",
    "EngineStats",
    "Outbox",
    "Output",
    "Scheduler",
    "Sequence",
    "Status",
    "StepEngine",
    "caption_request",
    "run_alone",
    "step_request",
    "text_request",
]


def step_request(model, tokens, state: dict[str, np.ndarray] | None = None) -> Sequence:
    """Feed `tokens` (ids) from `state` (batch of 1; None: zeros) and get back the logits
    after the last one and the new state: the transport-free form of a client-driven
    sequence (Triton's sequence batcher with implicit state keeps `state` between calls).
    It joins the model's continuous batch like any stream."""
    ids = np.asarray(tokens, np.int64).reshape(-1)
    if not len(ids) or ids.min() < 0 or ids.max() >= len(model.vocab):
        raise InvalidArgument(
            "tokens", f"{len(ids)} ids; need at least one, each 0 to {len(model.vocab) - 1}"
        )
    return Sequence(pending=ids, sampler=None, max_tokens=0, output=Output(), state=state)


def text_request(
    model: LanguageModel,
    prompt: str,
    max_tokens: int,
    params: SamplingParams,
    stop: list[str] = (),
) -> Sequence:
    """A generation from `prompt`: BOS and the prompt go through the prefill graph (in
    chunks), then one step per sampled token."""
    ids = model.encode(prompt)
    sampler = Sampler(params, len(model.vocab))
    sampler.see(ids)
    return Sequence(
        pending=np.asarray([model.bos, *ids], np.int64),
        sampler=sampler,
        max_tokens=max_tokens,
        output=TextOutput(model.vocab, list(stop), params.min_tokens),
        prompt_tokens=len(ids),
    )


def caption_request(
    model: Captioner, image: np.ndarray, max_length: int, params: SamplingParams
) -> Sequence:
    """A caption of `image` ([C, H, W], preprocessed): the encoder gives the decoder's
    initial state (run here, outside the batch), then <start> and one word per step."""
    return Sequence(
        pending=np.asarray([model.bos], np.int64),
        sampler=Sampler(params, len(model.vocab)),
        max_tokens=max_length,
        output=WordOutput(model.vocab),
        state=model.initial_state(image),
    )
