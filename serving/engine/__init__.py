"""The engine: jobs as plain objects (`request`, `beam`), and one continuous-batching
engine per step model (`engine`) made of three pieces: the scheduler decides
(`scheduler`), the runner runs the graphs (`runner`), the update samples and delivers
(`update`, with `sampler` and token ids -> client text in `output`). No gRPC.

`text_request`, `caption_request` and `step_request` turn validated parameters into a
`Sequence`, `beam_request` into a `BeamSearch`; `StepEngine.submit` adds either to the
model's batch; the transport takes `Delta`s from its outbox.
"""

from __future__ import annotations

import numpy as np

from serving.core.models import Captioner, LanguageModel
from serving.engine.beam import Beam, BeamSearch
from serving.engine.engine import EngineCore, StepEngine, run_alone
from serving.engine.output import Output, TextOutput, WordOutput
from serving.engine.request import Delta, Outbox, Sequence, Status
from serving.engine.runner import Outputs, Runner
from serving.engine.sampler import Sampler, SamplingParams
from serving.engine.scheduler import EngineConfig, Plan, Scheduler
from serving.engine.stats import EngineObserver, EngineStats
from serving.engine.update import Update
from serving.errors import InvalidArgument

__all__ = [
    "Beam",
    "BeamSearch",
    "Delta",
    "EngineConfig",
    "EngineCore",
    "EngineObserver",
    "EngineStats",
    "Outbox",
    "Output",
    "Outputs",
    "Plan",
    "Runner",
    "Scheduler",
    "Sequence",
    "Status",
    "StepEngine",
    "Update",
    "beam_request",
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


def beam_request(
    model: Captioner, image: np.ndarray, beam_size: int, max_length: int
) -> BeamSearch:
    """A beam search for the caption of `image` ([C, H, W], preprocessed): the encoder
    gives the decoder's initial state (run here, outside the batch); then its live beams
    (up to `beam_size`) step as rows of the model's batch, beside every other stream,
    until `beam_size` captions have ended or `max_length` tokens. Its deltas carry the
    words once decided (`pieces`); the last one the ranked beams (`beams`)."""
    if beam_size < 1:
        raise InvalidArgument("beam_size", f"got {beam_size}; allowed 1 or more")
    if max_length < 1:
        raise InvalidArgument("max_length", f"got {max_length}; allowed 1 or more")
    return BeamSearch(model, model.initial_state(image), beam_size, max_length)
