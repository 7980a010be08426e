"""The data plane: what both protocols ask of the models, without a transport.

`DataPlane` answers in plain values: a classification, output tensors, streams of
`serving.engine.Delta`s, a sequence step's logits. It alone picks how a request runs
(a classifier's dynamic batcher or a worker thread, a step model's engine), holds the
deployment's lease while it does, and notices a reload that replaced the model the
request was validated against. The servicers in `serving.api` only translate protobuf
to these calls and map errors to statuses; tests drive it without gRPC.

Blocking work (decoding an image, a graph run outside a batch) goes to the worker
pool, but for small requests on graphs shown to be quick, which run on the event loop
(`serving.dataplane.inline`); a stream holds no thread, only its row in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving.core.models import Captioner, Classifier, LanguageModel, Model
from serving.core.preprocess import ImageDecoder
from serving.core.repository import ModelRegistry
from serving.dataplane import inline
from serving.dataplane.deployments import Deployment, Deployments
from serving.dataplane.sequences import MAX_SEQUENCES, SequenceStore, idle_us
from serving.dataplane.stream import OutboxReader, Stream
from serving.engine import (
    beam_request,
    caption_request,
    step_request,
    text_request,
)
from serving.engine.sampler import SamplingParams
from serving.errors import (
    FailedPrecondition,
    InvalidArgument,
    NonFiniteOutput,
    NotFound,
    Unavailable,
)
from serving.metrics.statistics import RequestTiming, Statistics

CLASSIFY_TOP_K_DEFAULT = 5


@dataclass(frozen=True)
class Classification:
    model: Classifier
    classes: list[tuple[int, str, float]]  # (index, label, probability), most likely first


class DataPlane:
    def __init__(
        self,
        registry: ModelRegistry,
        deployments: Deployments,
        images: ImageDecoder,
        workers: Executor | None = None,
        statistics: Statistics | None = None,
        max_sequences_per_client: int = MAX_SEQUENCES,
    ):
        self.registry, self.deployments, self.images = registry, deployments, images
        self.workers = workers
        self.statistics = statistics or deployments.statistics  # every protocol's calls
        self.max_sequences_per_client = max_sequences_per_client
        self.sequences: dict[str, SequenceStore] = {}  # model name -> server-held state
        self.control = None  # serving.dataplane.control.ModelControl: load and unload
        self.accepting = True  # false once shutdown begins: readiness says so at once
        self.loop_budget = inline.LoopBudget()  # inline work's share of the loop

    # -- what serves -------------------------------------------------------------------

    def models(self) -> list[Model]:
        return [m for _, m in sorted(self.registry.models.items())]

    def model(self, name: str, kind: str, field: str = "model") -> Model:
        """The served model `name`, which must be a `kind` (stepwise.v1's messages)."""
        return self.registry.get(name, kind, field)

    def model_version(self, name: str, version: str = "") -> Model:
        """The served model `name`, at `version` when one is given (KServe's messages)."""
        model = self.registry.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.registry.models)) or "none"
            raise NotFound(f"model_name: no model named {name!r}; available: {known}")
        if version and version != model.version:
            raise NotFound(
                f"model_version: {name!r} has no version {version!r}; served: {model.version}"
            )
        return model

    @property
    def ready(self) -> bool:
        """Accepting, serving some model, and every step model's engine taking jobs (an
        engine process that died is not, until it is back)."""
        engines = list(self.deployments.engines.values())
        return self.accepting and bool(self.registry.models) and all(e.available for e in engines)

    def model_ready(self, name: str, version: str = "") -> bool:
        model = self.registry.models.get(name)
        if not (self.accepting and model is not None and version in ("", model.version)):
            return False
        engine = self.deployments.engines.get(name)
        return engine is None or engine.available

    def timed(self, model: Model, timing: RequestTiming | None = None):
        """The request's statistics: `timing` as given, else a request of its own."""
        if timing is not None:
            return contextlib.nullcontext(timing)
        return self.statistics[model.name].request()

    def deployment_of(self, model: Model) -> Deployment:
        """The deployment serving `model`; UNAVAILABLE when a reload replaced it."""
        deployment = self._current(model)
        if deployment is None:
            raise Unavailable(f"{model.name} was reloaded as this request began; retry")
        return deployment

    def _current(self, model: Model) -> Deployment | None:
        """The deployment serving `model`, None when a reload replaced it."""
        deployment = self.deployments.get(model.name)
        return deployment if deployment is not None and deployment.model is model else None

    def _batching(self, model: Model) -> Deployment | None:
        """The deployment serving `model` when it has a dynamic batcher; None: run on a
        worker (no batcher, or a reload replaced the model this request was given)."""
        deployment = self._current(model)
        return deployment if deployment is not None and deployment.batcher is not None else None

    async def blocking(self, fn, *args):
        """Run `fn(*args)` on the worker pool; the event loop goes on serving."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    # -- classifiers -------------------------------------------------------------------

    async def classify(
        self,
        model: Classifier,
        top_k: int = 0,
        image: bytes | None = None,
        tensor: np.ndarray | Callable[[], np.ndarray] | None = None,
        timing: RequestTiming | None = None,
    ) -> Classification:
        """The `top_k` most likely classes (0: the default) of an encoded `image`, or of
        a `tensor` [C, H, W] (or a function that decodes it, run on the worker pool)."""
        with self.timed(model, timing) as timing:
            deployment = self._batching(model)

            def prepare(wait: bool = True):
                timing.mark("queue")  # waited for a worker
                x = self._input(model, image, tensor, wait)
                if x is None:  # every decoder busy, and this may not wait (the loop)
                    return None
                timing.mark("input")
                return x, _top_k(model, top_k)

            if deployment is None:  # decode and run here when small and quick, else on a worker
                if _small(image, tensor) and self._inline(model, 1):
                    with self.loop_budget.spending():
                        result = self._classify_here(model, prepare, timing, tensor, wait=False)
                    if result is not None:
                        return result
                return await self.blocking(self._classify_here, model, prepare, timing, tensor)
            # Decode on a worker, then wait for the batch on the loop (no worker held).
            with deployment.lease():
                x, top_k = await self.blocking(prepare)
                try:
                    logits = await asyncio.wrap_future(deployment.batcher.enqueue(x, timing))
                except NonFiniteOutput as exc:
                    raise _overflow(model, tensor, x, exc) from None
            result = _classification(model, model.softmax(logits), top_k)
            timing.mark("output")
            return result

    def _input(self, model: Classifier, image, tensor, wait: bool = True) -> np.ndarray | None:
        if (image is None) == (tensor is None):
            raise InvalidArgument("input", "set one of image (encoded PNG/JPEG) or tensor")
        if image is not None:
            return self.images.tensor(image, model.preprocess, wait=wait)
        return model.check_tensor(tensor() if callable(tensor) else tensor)

    def _inline(self, model: Model, rows: int) -> bool:
        """Whether `rows` of `model` may run on the loop now: its recent runs were quick
        enough at that many rows, and the loop has time (`serving.dataplane.inline`)."""
        deployment = self._current(model)
        return deployment is not None and deployment.runs.quick(rows) and self.loop_budget.allows()

    def _ran(self, model: Model, ns: int, rows: int = 1) -> None:
        deployment = self._current(model)
        if deployment is not None:
            deployment.runs.add(ns, rows)

    def _classify_here(
        self, model: Classifier, prepare, timing: RequestTiming, tensor, wait: bool = True
    ) -> Classification | None:
        """Decode and run on this thread (None: every decoder busy and not `wait`)."""
        prepared = prepare(wait)
        if prepared is None:
            return None
        x, top_k = prepared
        start = timing.ns["infer"]
        try:
            probs = model.probabilities(x[None])[0]
        except NonFiniteOutput as exc:
            raise _overflow(model, tensor, x, exc) from None
        timing.mark("infer")
        self._ran(model, timing.ns["infer"] - start)
        self.statistics[model.name].execution(1, timing.ns["infer"])
        result = _classification(model, probs, top_k)
        timing.mark("output")
        return result

    # -- any graph as plain tensors ----------------------------------------------------

    async def infer(
        self, model: Model, feeds: dict[str, np.ndarray], wanted: list[str], timing: RequestTiming
    ) -> dict[str, np.ndarray]:
        """Run `model.onnx` (a classifier, or a step model's step graph with its state as
        plain inputs and outputs; state left out starts at zero, as Triton's implicit
        state does) on `feeds`; the `wanted` outputs by name. A classifier's rows join
        its dynamic batch."""
        state = [s.input for s in model.card.state]
        if state and not any(name in feeds for name in state):
            feeds.update(model.zero_state(len(feeds["tokens"])))
        deployment = self._batching(model)
        if deployment is not None:
            with deployment.lease():  # each row through the same queue as Classify's
                futures = deployment.batcher.enqueue_rows(feeds[model.input.name], timing)
                try:
                    rows = [await asyncio.wrap_future(f) for f in futures]
                except NonFiniteOutput:
                    raise _non_finite(model) from None
            return {"logits": np.stack(rows)}
        session = model.graphs["step"] if hasattr(model, "graphs") else model.session
        stats = self.statistics[model.name]

        rows = len(next(iter(feeds.values()))) if feeds else 0

        def run():
            timing.mark("queue")  # waited for a worker
            values = session.run(wanted, feeds)
            timing.mark("infer")
            self._ran(model, timing.ns["infer"], rows)
            stats.execution(timing.count, timing.ns["infer"])
            return values

        try:
            if inline.small_tensors(feeds.values(), rows) and self._inline(model, rows):
                with self.loop_budget.spending():  # small and quick: here, on the loop
                    values = run()
            else:
                values = await self.blocking(run)
        except Exception as exc:  # noqa: BLE001 - ORT rejects what its graph cannot take
            raise InvalidArgument("inputs", f"the graph refused them: {exc}"[:400]) from None
        if any(v.dtype.kind == "f" and not np.all(np.isfinite(v)) for v in values):
            raise _non_finite(model)
        return dict(zip(wanted, values, strict=True))

    # -- streams -----------------------------------------------------------------------

    def generate(
        self,
        model: LanguageModel,
        prompt: str,
        max_tokens: int,
        params: SamplingParams,
        stop: list[str] = (),
        deadline: float | None = None,
        timing: RequestTiming | None = None,
        interval_ms: int = 0,
    ) -> Stream:
        """Text from `prompt`, as a stream of deltas (`Stream`); tokens within
        `interval_ms` of each other share a delta."""
        seq = text_request(model, prompt, max_tokens, params, list(stop))
        return Stream(self, model, lambda: seq, deadline, timing, interval_ms / 1000)

    def caption(
        self,
        model: Captioner,
        image: bytes,
        max_length: int,
        params: SamplingParams,
        beam_size: int = 0,
        deadline: float | None = None,
        timing: RequestTiming | None = None,
        interval_ms: int = 0,
    ):
        """A caption of an encoded `image`, as a stream of deltas (each word a piece);
        with `beam_size` > 1, beam search, whose last delta carries the ranked beams."""

        def job():  # decoding and encoding, too, happen inside the stream's slot
            tensor = self.images.tensor(image, model.preprocess)
            if beam_size > 1:  # beam_size rows of the same continuous batch
                return beam_request(model, tensor, beam_size, max_length)
            return caption_request(model, tensor, max_length, params)

        return Stream(self, model, job, deadline, timing, interval_ms / 1000)

    # -- server-held sequences ---------------------------------------------------------

    def sequence_deployment(self, model: Model) -> Deployment:
        """Where `model`'s sequences step: INVALID_ARGUMENT for a model without state,
        UNAVAILABLE when a reload replaced it (asked before the request is decoded)."""
        deployment = self.deployments.get(model.name)
        if deployment is None or deployment.engine is None:
            raise InvalidArgument(
                "parameters.sequence_id", f"{model.name} is not a step model (no state)"
            )
        return self.deployment_of(model)

    async def step(
        self,
        model: Model,
        client: str,
        key: str,
        tokens: np.ndarray,
        start: bool = False,
        end: bool = False,
        timing: RequestTiming | None = None,
    ) -> np.ndarray:
        """Triton's sequence batcher with implicit state: feed `tokens` to sequence `key`
        of `client` from the state the server holds for it (zeros at `start`), keep the
        new state (dropped at `end`), return the logits [V] after the last token. Each
        step joins the model's continuous batch."""
        deployment = self.sequence_deployment(model)
        store = self.sequences.get(model.name)
        if store is None:
            store = SequenceStore(idle_us(model), per_client=self.max_sequences_per_client)
            self.sequences[model.name] = store
        with self.timed(model, timing) as timing, deployment.lease():
            async with store.hold(client, key, start) as entry:
                timing.mark("queue")  # the sequence's previous step went first
                if start:
                    entry.version = model.version
                elif entry.version != model.version:  # its state belongs to another version
                    store.end((client, key))
                    raise FailedPrecondition(
                        f"parameters.sequence_id: sequence {key} started on version "
                        f"{entry.version}; {model.name} now serves version {model.version}: "
                        "start it again (sequence_start)"
                    )
                seq = step_request(model, tokens, entry.state)
                reader = OutboxReader(seq.outbox)
                deployment.engine.submit(seq)
                try:
                    delta = await reader.next()  # a step request ends with its one delta
                finally:
                    deployment.engine.cancel(seq)
                if delta.error is not None:
                    raise delta.error
                timing.engine(delta.queue_time_us * 1000)
                entry.state = delta.state
                if end:
                    store.end((client, key))
        return delta.logits

    # -- model control -----------------------------------------------------------------

    def check_control(self, rpc: str):
        control = self.control
        if control is None or control.mode != "explicit":
            mode = control.mode if control is not None else "none"
            raise FailedPrecondition(
                f"{rpc}: model control mode is {mode!r}; explicit load and unload need "
                "--model-control-mode explicit"
            )
        if not self.accepting:
            raise Unavailable(f"{rpc}: the server is shutting down")
        return control

    async def load(self, name: str, rpc: str = "RepositoryModelLoad") -> str:
        """Serve the repository's highest version of `name` (explicit model control)."""
        return await self.blocking(self.check_control(rpc).load, name)

    async def unload(self, name: str, rpc: str = "RepositoryModelUnload") -> None:
        await self.blocking(self.check_control(rpc).unload, name)  # it may wait for a load


def _small(image: bytes | None, tensor) -> bool:
    """A Classify input small enough for the loop (a tensor still to be decoded is not)."""
    if image is not None:
        return inline.plain_png(image)
    return tensor is not None and not callable(tensor) and inline.small_tensors([tensor], 1)


def _top_k(model: Classifier, top_k: int) -> int:
    classes = len(model.labels)
    default = min(CLASSIFY_TOP_K_DEFAULT, classes)
    if not 0 <= top_k <= classes:
        raise InvalidArgument("top_k", f"got {top_k}; allowed 0 (default {default}) to {classes}")
    return top_k or default


def _classification(model: Classifier, probs: np.ndarray, top_k: int) -> Classification:
    order = np.argsort(-probs, kind="stable")[:top_k]
    return Classification(model, [(int(i), model.labels[i], float(probs[i])) for i in order])


def _overflow(model: Classifier, tensor, x: np.ndarray, exc: NonFiniteOutput) -> Exception:
    """A tensor the client sent that overflows the network is the client's error; a
    preprocessed image is in range, so there the model is at fault (INTERNAL)."""
    if tensor is None:
        return exc
    largest = float(np.max(np.abs(x)))
    return InvalidArgument(
        "tensor.raw_data",
        f"values up to magnitude {largest:.3g} overflow {model.name} ({exc}); send the "
        "preprocessed range the model was trained on",
    )


def _non_finite(model: Model) -> InvalidArgument:
    return InvalidArgument(
        "inputs", f"{model.name} produced non-finite values from them (out of range?)"
    )
