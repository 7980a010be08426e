"""What an engine did, counted in one place (`EngineStats`: the scheduler, the runner
and the update each add their part to one object), and what it reports as it goes
(`EngineObserver`, for metrics)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """What the engine did, counted in one place for tests, metrics and benchmarks."""

    iterations: int = 0
    step_runs: int = 0
    prefill_runs: int = 0
    joins: int = 0
    leaves: int = 0
    refused: int = 0
    preemptions: int = 0  # prefilling streams swapped out for a shorter prompt
    batch_sizes: Counter = field(default_factory=Counter)  # decode rows per step run -> runs
    # Batched state moved between host and device (bound decode runs only): an upload
    # when the decode batch's streams change, a download before that and for answers.
    state_uploads: int = 0
    state_downloads: int = 0
    finish_reasons: Counter = field(default_factory=Counter)


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
