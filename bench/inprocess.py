"""The physical limit: each default model's graphs run in process on ONNX Runtime,
with the session options serving uses, and step-wise generation against re-running
the whole prefix for every token."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.core.card import ModelCard


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _timed(run, min_seconds: float) -> tuple[int, float, float]:
    """Call `run` until min_seconds of wall time pass: (calls, wall s, CPU s)."""
    run()  # warm-up: first-run allocations
    calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        run()
        calls += 1
        wall = time.perf_counter() - wall0
        if wall >= min_seconds:
            return calls, wall, time.process_time() - cpu0


def _zeros_state(card: ModelCard, batch: int) -> dict:
    return {s.input: np.zeros(s.zeros_shape(batch), s.dtype) for s in card.state}


def step_graph(directory: Path, batches: list[int], min_seconds: float) -> list[dict]:
    """A step graph (language model or the captioner's decoder) at each batch size:
    steps/s and tokens/s (a step of batch B makes B tokens), per wall and CPU second."""
    card = ModelCard.read(directory)
    session = _session(directory / card.graphs["step"])
    outputs = ["logits", *(s.output for s in card.state)]
    rows = []
    for batch in batches:
        feeds = {"tokens": np.ones((batch, 1), np.int64), **_zeros_state(card, batch)}
        calls, wall, cpu = _timed(lambda feeds=feeds: session.run(outputs, feeds), min_seconds)
        rows.append(
            {
                "model": card.name,
                "graph": "step",
                "batch": batch,
                "us_per_call": round(1e6 * wall / calls, 1),
                "tokens_per_s": round(calls * batch / wall, 1),
                "tokens_per_cpu_s": round(calls * batch / cpu, 1) if cpu else None,
            }
        )
    return rows


def classifier(directory: Path, batches: list[int], min_seconds: float) -> list[dict]:
    card = ModelCard.read(directory)
    session = _session(directory / card.graphs["model"])
    spec = card.inputs[0]
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).random([batch, *spec.shape[1:]], np.float32)
        calls, wall, cpu = _timed(lambda x=x: session.run(["logits"], {spec.name: x}), min_seconds)
        rows.append(
            {
                "model": card.name,
                "graph": "model",
                "batch": batch,
                "us_per_call": round(1e6 * wall / calls, 1),
                "images_per_s": round(calls * batch / wall, 1),
                "images_per_cpu_s": round(calls * batch / cpu, 1) if cpu else None,
            }
        )
    return rows


def step_vs_recompute(directory: Path, lengths: list[int]) -> list[dict]:
    """Generate T tokens (batch 1) two ways: one step graph run per token, carrying the
    state (O(T)), and the prefill graph over the whole prefix for every token (O(T^2),
    what a model without explicit state must do). Same tokens both ways."""
    card = ModelCard.read(directory)
    step = _session(directory / card.graphs["step"])
    prefill = _session(directory / card.graphs["prefill"])
    names = ["logits", *(s.output for s in card.state)]
    inputs = [s.input for s in card.state]
    rows = []
    for length in lengths:
        tokens = np.random.default_rng(0).integers(1, len(card.vocab), length)
        state = _zeros_state(card, 1)
        start = time.perf_counter()
        for t in tokens:
            _, *new = step.run(names, {"tokens": np.asarray([[t]], np.int64), **state})
            state = dict(zip(inputs, new, strict=True))
        stepwise = time.perf_counter() - start
        start = time.perf_counter()
        for t in range(1, length + 1):
            prefix = np.asarray([tokens[:t]], np.int64)
            prefill.run(["logits"], {"tokens": prefix, **_zeros_state(card, 1)})
        recompute = time.perf_counter() - start
        rows.append(
            {
                "model": card.name,
                "tokens": length,
                "stepwise_s": round(stepwise, 4),
                "recompute_s": round(recompute, 4),
                "speedup": round(recompute / stepwise, 1),
            }
        )
    return rows
