"""Per-window figures: HDR histograms (microseconds) and counts, mergeable across
workers and windows. Percentiles are read from merged histograms, never averaged."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

LOWEST_US, HIGHEST_US, DIGITS = 1, 3_600_000_000, 3  # 1 us .. 1 hour, 3 significant digits
HISTOGRAMS = ("latency", "ttft", "itl", "tpot", "gap", "send_delay")
PERCENTILES = (50, 90, 95, 99)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def _clamp(value_us: float) -> int:
    return int(min(max(value_us, LOWEST_US), HIGHEST_US))


@dataclass
class Window:
    """What one worker (or, merged, all of them) saw in one measurement window."""

    seconds: float = 0.0  # wall time the window covered
    codes: Counter = field(default_factory=Counter)  # status name -> completed requests
    tokens: int = 0  # streams: output tokens whose messages arrived in the window
    messages: int = 0  # ... and those messages
    sent: int = 0  # requests started in the window
    scheduled: int = 0  # open loop: sends due in the window (by the arrival schedule)
    delayed: int = 0  # open loop: sends more than DELAY_TOLERANCE_US late
    loadgen_cpu_s: float = 0.0  # the workers' own CPU time in the window
    loadgen_cpu_max_s: float = 0.0  # the busiest worker's (a worker is ~one core at most)
    histograms: dict[str, HdrHistogram] = field(
        default_factory=lambda: {name: new_histogram() for name in HISTOGRAMS}
    )

    def add_tokens(self, tokens: int) -> None:
        """One output message of `tokens` tokens arrived (counted when it arrives, so a
        stream longer than a window still counts in every window it delivers in)."""
        self.tokens += tokens
        self.messages += 1

    def record(self, outcome) -> None:
        """A finished request: its status, and its latencies when it succeeded."""
        self.codes[outcome.code] += 1
        if outcome.code != "OK":
            return
        h = self.histograms
        h["latency"].record_value(_clamp(outcome.latency_us))
        if outcome.ttft_us is not None:
            h["ttft"].record_value(_clamp(outcome.ttft_us))
            if outcome.tokens > 1:  # genai-perf's inter-token latency
                itl = (outcome.latency_us - outcome.ttft_us) / (outcome.tokens - 1)
                h["itl"].record_value(_clamp(itl))
            if outcome.tokens:
                h["tpot"].record_value(_clamp(outcome.latency_us / outcome.tokens))
            for gap in outcome.gaps_us:
                h["gap"].record_value(_clamp(gap))

    def merge(self, other: Window) -> Window:
        """Add `other` into this window (same interval from another worker, or the next
        interval of the same level: the caller sets `seconds`)."""
        self.codes.update(other.codes)
        self.tokens += other.tokens
        self.messages += other.messages
        self.sent += other.sent
        self.scheduled += other.scheduled
        self.delayed += other.delayed
        self.loadgen_cpu_s += other.loadgen_cpu_s
        self.loadgen_cpu_max_s = max(self.loadgen_cpu_max_s, other.loadgen_cpu_max_s)
        for name, histogram in other.histograms.items():
            self.histograms[name].add(histogram)
        return self

    # Worker processes send windows to the parent as plain data.
    def encode(self) -> dict:
        return {
            "seconds": self.seconds, "codes": dict(self.codes), "tokens": self.tokens,
            "messages": self.messages, "sent": self.sent, "scheduled": self.scheduled,
            "delayed": self.delayed, "loadgen_cpu_s": self.loadgen_cpu_s,
            "loadgen_cpu_max_s": self.loadgen_cpu_max_s,
            "histograms": {k: h.encode() for k, h in self.histograms.items()},
        }  # fmt: skip

    @classmethod
    def decode(cls, data: dict) -> Window:
        scalars = {k: v for k, v in data.items() if k not in ("codes", "histograms")}
        window = cls(codes=Counter(data["codes"]), **scalars)
        for name, encoded in data["histograms"].items():
            window.histograms[name].decode_and_add(encoded)
        return window

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    @property
    def successes(self) -> int:
        return self.codes.get("OK", 0)

    def throughput(self) -> float:
        return self.successes / self.seconds if self.seconds else 0.0

    def percentile_us(self, name: str, p: float) -> int:
        return int(self.histograms[name].get_value_at_percentile(p))

    def distribution(self, name: str) -> dict | None:
        h = self.histograms[name]
        if not h.get_total_count():
            return None
        out = {"avg": round(h.get_mean_value(), 1)}
        out.update({f"p{p}": int(h.get_value_at_percentile(p)) for p in PERCENTILES})
        out["max"] = int(h.get_max_value())
        out["count"] = int(h.get_total_count())
        return out


def stable(windows: list[Window], tolerance: float, last: int = 3) -> bool:
    """perf_analyzer's rule: throughput and p95 latency of the last `last` windows each
    within `tolerance` (0.1 = 10%) of their mean."""
    if len(windows) < last:
        return False
    recent = windows[-last:]
    for values in (
        [w.throughput() for w in recent],
        [w.percentile_us("latency", 95) for w in recent],
    ):
        mean = sum(values) / len(values)
        if mean == 0 or any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True
