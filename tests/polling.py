"""Waiting in tests for what a server does a moment after the client has its answer."""

from __future__ import annotations

import time


def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Whether `predicate()` turns true within `timeout` seconds (checked once more at
    the end, so a slow machine gets its last chance)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
