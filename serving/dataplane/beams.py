"""Beam-search captions as a stream of deltas, stepped on the worker pool (a batch of
`beam_size` rows of their own, outside the engine)."""

from __future__ import annotations

import time

from serving.engine import Delta
from serving.engine.beam import beam_search
from serving.errors import Cancelled


def beam_stream(plane, model, image: bytes, beam_size: int, max_length: int, timing):
    return BeamStream(plane, model, image, beam_size, max_length, timing)


class BeamStream:
    """Deltas of decided words; the last carries the ranked beams (`Delta.beams`)."""

    def __init__(self, plane, model, image, beam_size, max_length, timing):
        self.plane, self.model, self.image = plane, model, image
        self.beam_size, self.max_length, self.timing = beam_size, max_length, timing
        self.active, self._error = True, None

    def cancel(self, error: Exception | None = None) -> None:
        self._error = error or Cancelled("the stream was cancelled")
        self.active = False

    async def __aiter__(self):
        plane, model = self.plane, self.model
        with plane.timed(model, self.timing) as timing:
            tensor = await plane._blocking(plane.images.tensor, self.image, model.preprocess)
            initial = await plane._blocking(model.initial_state, tensor)
            search = beam_search(
                model, initial, self.beam_size, self.max_length, lambda: self.active
            )
            start, first = time.monotonic(), 0.0
            try:
                while (event := await plane._blocking(next, search, None)) is not None:
                    if self._error is not None:
                        break
                    first = first or (time.monotonic() if event.words else 0.0)
                    delta = Delta(pieces=list(event.words))
                    if event.beams is not None:
                        best = event.beams[0] if event.beams else None
                        delta.finished = True
                        delta.finish_reason = "eos" if best and best.finished else "length"
                        delta.completion_tokens = best.tokens if best else 0
                        delta.time_to_first_token_us = int(
                            ((first or time.monotonic()) - start) * 1e6
                        )
                        delta.beams = event.beams
                    yield delta
                    if self._error is not None:
                        break
            finally:
                self.active = False
            timing.mark("infer")  # beam search runs its own batch: all of it is compute
            if self._error is not None:  # stopped by the watchdog: never end it OK
                raise self._error
