"""What serves each model name: the model, and the part its requests run through (a
step model's continuous-batching engine, a classifier's dynamic batcher, or neither).

A `Deployment` is one model version with its parts, immutable once built; a reload
replaces a name's deployment with a new one. A request picks a deployment once and
holds a lease on it until it is done, so a replaced deployment's engine and batcher
are closed only after its last request (streams on an old version finish there).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from serving.batching.dynamic import BatchingConfig, DynamicBatcher
from serving.core.models import Classifier, Model, StepDecoder
from serving.core.repository import ModelRegistry
from serving.dataplane.inline import RunTimes
from serving.engine import EngineConfig, EngineObserver, StepEngine
from serving.errors import Unavailable
from serving.metrics.statistics import Statistics

log = logging.getLogger(__name__)

# A replaced engine or batcher still held after this long is closed anyway.
RETIRE_LIMIT_S = 3600


def model_batching(model_config, default: BatchingConfig) -> BatchingConfig:
    """A classifier's dynamic batching: its config.pbtxt's `dynamic_batching` block
    (Triton's semantics, up to its `max_batch_size`) when present, else the flags'."""
    if model_config.max_batch_size < 1:  # 0, proto3's default: not set
        return default
    if not model_config.HasField("dynamic_batching"):  # the flags', within the model's cap
        return dataclasses.replace(
            default, max_batch_size=min(default.max_batch_size, model_config.max_batch_size)
        )
    block = model_config.dynamic_batching
    return dataclasses.replace(
        default,
        max_batch_size=model_config.max_batch_size,
        max_queue_delay_us=block.max_queue_delay_microseconds,
        preferred_batch_sizes=tuple(block.preferred_batch_size),
    )


def model_engine(model_config, default: EngineConfig) -> EngineConfig:
    """A step model's continuous batch: the flags' size, capped by its config.pbtxt's
    `max_batch_size` when that is set (0, proto3's default, reads as not set)."""
    if model_config.max_batch_size < 1:
        return default
    return dataclasses.replace(
        default, max_batch_size=min(default.max_batch_size, model_config.max_batch_size)
    )


class Deployment:
    """One model version and the parts its requests run through."""

    def __init__(
        self, model: Model, engine: StepEngine | None = None, batcher: DynamicBatcher | None = None
    ):
        self.model, self.engine, self.batcher = model, engine, batcher
        self.runs = RunTimes()  # its graph runs outside a batch: quick ones run inline
        self._lock = threading.Lock()
        self.retired = False

    @contextlib.contextmanager
    def lease(self):
        """Held by a request from the moment it picked this deployment until it is done
        with it: a replaced deployment is closed only after its last lease. A request
        that picked it just as a reload replaced it hears UNAVAILABLE, and may retry."""
        with contextlib.ExitStack() as held:
            with self._lock:
                if self.retired:
                    raise Unavailable(
                        f"{self.model.name} was reloaded as this request began; retry"
                    )
                for part in (self.engine, self.batcher):
                    if part is not None:
                        held.enter_context(part.lease())
            yield self

    def busy(self) -> bool:
        return any(part is not None and part.busy() for part in (self.engine, self.batcher))

    def close(self) -> None:
        for part in (self.engine, self.batcher):
            if part is not None:
                part.close()

    def retire(self, closed: Callable[[], None] = lambda: None) -> None:
        """No new leases; close once the held ones are given back (on a thread of its
        own), then call `closed`."""
        with self._lock:
            self.retired = True

        def wait_then_close():
            end = time.monotonic() + RETIRE_LIMIT_S
            while time.monotonic() < end and self.busy():
                time.sleep(0.05)
            self.close()
            closed()

        threading.Thread(target=wait_then_close, name="retire", daemon=True).start()


class Deployments:
    """Name -> its deployment, for every served model (`attach` each of the registry's
    models to start). `engines` and `batchers` are the live parts by name (what metrics
    read); the registry's `models` follows."""

    def __init__(
        self,
        registry: ModelRegistry,
        statistics: Statistics,
        batching: BatchingConfig | None = None,
        engine: EngineConfig | None = None,
        observer: Callable[[str], EngineObserver | None] = lambda name: None,
        engines: Callable = StepEngine,
    ):
        """`engines(model, config, observer, stats)` builds a step model's engine: a
        `StepEngine` in this process, or `serving.remote.link.EngineLink.engine` for one
        in the engine process."""
        self.registry, self.statistics = registry, statistics
        self.batching, self.engine = batching or BatchingConfig(), engine or EngineConfig()
        self.observer, self.make_engine = observer, engines
        self._live: dict[str, Deployment] = {}
        self.engines: dict[str, StepEngine] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.retiring: set[Deployment] = set()
        self.on_change: list[Callable[[], None]] = []  # after each attach and detach

    def get(self, name: str) -> Deployment | None:
        return self._live.get(name)

    def attach(self, name: str, model: Model) -> None:
        """Serve `model` as `name`; the deployment it replaces (a reload) retires."""
        old = self._live.get(name)
        if old is not None and old.model.version != model.version:
            self.statistics.reset(name)  # a new version's counts start at zero, as in Triton
        batching = model_batching(model.config, self.batching)
        batcher = engine = None
        if isinstance(model, Classifier) and batching.max_batch_size > 1:
            batcher = DynamicBatcher(name, model.logit_rows, batching, self.statistics[name])
        if isinstance(model, StepDecoder):
            engine = self.make_engine(
                model,
                model_engine(model.config, self.engine),
                self.observer(name),
                self.statistics[name].engine,  # counted with the model's other counters
            )
        self._publish(name, Deployment(model, engine, batcher))
        if old is not None and old.model is not model:
            self._retire(old)
        self._changed()

    def detach(self, name: str) -> None:
        """Stop serving `name`; requests already running on it finish."""
        old = self._live.pop(name, None)
        self.registry.models.pop(name, None)
        self.engines.pop(name, None)
        self.batchers.pop(name, None)
        if old is not None:
            self._retire(old)
            self._changed()

    def _publish(self, name: str, deployment: Deployment) -> None:
        """The parts first, then the model: whoever sees the new model finds its parts."""
        for parts, part in ((self.engines, deployment.engine), (self.batchers, deployment.batcher)):
            if part is None:
                parts.pop(name, None)
            else:
                parts[name] = part
        self._live[name] = deployment
        self.registry.models[name] = deployment.model

    def _retire(self, deployment: Deployment) -> None:
        self.retiring.add(deployment)
        deployment.retire(lambda: self.retiring.discard(deployment))

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def close(self) -> None:
        """Close every engine and batcher, served or retiring (shutdown)."""
        for deployment in [*self._live.values(), *self.retiring]:
            deployment.close()
