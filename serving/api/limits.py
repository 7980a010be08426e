"""What one request may ask for, on both protocols: the bounds every message that
refuses a request names."""

from __future__ import annotations

MAX_TOKENS_DEFAULT, MAX_TOKENS_LIMIT = 256, 4096
TEMPERATURE_LIMIT = 10.0
REPETITION_PENALTY_LIMIT = 10.0
MAX_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 8, 64
MAX_PROMPT_CHARS = 16_384  # a Generate prompt, or a KServe request's token ids
MAX_CAPTION_WORDS = 64
MAX_BEAMS = 16
MAX_STREAM_INTERVAL_MS = 1000  # coalesced streaming: the longest a token may wait
MAX_TENSOR_DIMS = 8  # far above any model's rank; numpy itself stops at 64
