"""Counting the requests that hold a shared part of the server (a model's engine or
dynamic batcher) from the moment they pick it until they are done with it, so that a
reload retires the part only after its last user."""

from __future__ import annotations

import contextlib
import threading


class Leases:
    """A thread-safe count of holders."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0

    @contextlib.contextmanager
    def hold(self):
        with self._lock:
            self._count += 1
        try:
            yield
        finally:
            with self._lock:
                self._count -= 1

    @property
    def held(self) -> bool:
        with self._lock:
            return self._count > 0
