"""What an engine reports as it goes (`EngineObserver`, for metrics). What it did is
counted in `serving.metrics.statistics.EngineStats`, with the model's other counters
(the scheduler, the runner and the update each add their part to that one object)."""

from __future__ import annotations

from serving.metrics.statistics import EngineStats

__all__ = ["EngineObserver", "EngineStats"]


class EngineObserver:
    """What an engine reports as it goes, for metrics (`serving.metrics.prometheus`); these
    defaults ignore it. Called on the engine's thread: keep it cheap."""

    def run(self, graph: str, rows: int, seconds: float) -> None:
        """A graph run ("step": a decode iteration; "prefill": a prompt chunk) of `rows`
        rows (a stream each; a beam search's beams one each) that took `seconds`."""

    def first_token(self, seconds: float) -> None:
        """A stream's first token, `seconds` after it was submitted (a beam search's:
        its first step's)."""

    def token(self, gap_seconds: float) -> None:
        """A stream's next token, `gap_seconds` after its previous one (a beam search's
        next step)."""

    def tokens(self, gaps: list[float]) -> None:
        """An iteration's next tokens, each `gap` after its stream's previous one: one
        call for the whole batch (an observer may count them at once)."""
        for gap in gaps:
            self.token(gap)
