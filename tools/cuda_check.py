"""Check the CUDA execution provider path on a machine with a GPU and onnxruntime-gpu.

    python tools/cuda_check.py --repository model_repository --out cuda.json

What it checks, each against the CPU provider in the same process:
1. every model of the repository loads with `--device cuda` (and `auto` picks CUDA);
2. classifiers: the same probabilities (max abs difference reported);
3. step graphs: is a row's output at batch 1 bit-identical to the same row inside a
   batch of 64 (batch invariance), and how far CUDA is from the CPU;
4. the engine: 64 seeded streams alone vs continuously batched give the same text?
5. speed: step-graph tokens/s at batch 1 and 64, and the engine with 64 streams, with
   the decode state on the host or kept on the device (I/O binding, `bind_state`);
6. a real server with `device="cuda"` answers Classify and Generate over a channel.
Prints one JSON report; no assertion stops it half way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.core.models import Classifier, LanguageModel, load_model  # noqa: E402
from serving.core.repository import latest_versions  # noqa: E402
from serving.core.runtime import SessionFactory  # noqa: E402
from serving.engine import EngineConfig, EngineCore, Runner, run_alone, text_request  # noqa: E402
from serving.engine.sampler import SamplingParams  # noqa: E402


def _text(lm, seq, config: EngineConfig | None = None) -> str:
    return "".join(p for d in run_alone(lm, seq, config or EngineConfig()) for p in d.pieces)


def step_invariance(lm: LanguageModel, batch: int = 64, pad: bool = False) -> dict:
    """Is each row of a batch-`batch` step run bit-identical to the same row run alone
    (padded to `batch` rows with zero rows when `pad`, as EngineConfig.pad_batches does)?"""
    rng = np.random.default_rng(0)
    state = lm.zero_state(batch)
    state = {k: rng.normal(size=v.shape).astype(np.float32) * 0.5 for k, v in state.items()}
    tokens = rng.integers(1, len(lm.vocab), size=(batch, 1)).astype(np.int64)
    logits, _ = lm.run("step", tokens, state)
    run = Runner(lm, EngineConfig(max_batch_size=batch, pad_batches=pad)).padded_run
    worst, identical = 0.0, 0
    for i in range(batch):
        row = {k: np.take(v, [i], axis=lm.state_axis[k]) for k, v in state.items()}
        alone, _ = run("step", tokens[i : i + 1], row)
        identical += bool(np.array_equal(alone[0], logits[i]))
        worst = max(worst, float(np.max(np.abs(alone[0] - logits[i]))))
    return {"rows_bit_identical": identical, "of": batch, "max_abs_diff": worst}


def engine_invariance(
    lm: LanguageModel, n: int = 64, pad: bool | None = None, bind: bool | None = None
) -> dict:
    def request(i):
        prompt = "KING.\n" * (i % 4 + 1)
        return text_request(lm, prompt, 40, SamplingParams(temperature=0.9, seed=i))

    config = EngineConfig(max_batch_size=n, pad_batches=pad, bind_state=bind)
    alone = [_text(lm, request(i), config) for i in range(n)]
    s = EngineCore(lm, config)
    seqs = []
    for i in range(n):
        seqs.append(request(i))
        s.submit(seqs[-1])
        if i % 3 == 0:
            s.step()
    while s.has_work():
        s.step()
    batched = ["".join(q.outbox.take(timeout=0).pieces) for q in seqs]
    return {"streams_identical": sum(a == b for a, b in zip(alone, batched, strict=True)), "of": n}


def step_speed(lm: LanguageModel, batch: int, seconds: float = 1.0) -> float:
    state = lm.zero_state(batch)
    tokens = np.ones((batch, 1), np.int64)
    for _ in range(5):
        lm.run("step", tokens, state)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, state = lm.run("step", tokens, state)
        runs += 1
    return runs * batch / (time.perf_counter() - start)


def engine_speed(
    lm: LanguageModel, streams: int, tokens: int = 200, pad_to: int = 0, bind: bool = False
) -> float:
    config = EngineConfig(
        max_batch_size=pad_to or streams, pad_batches=bool(pad_to), bind_state=bind
    )
    s = EngineCore(lm, config)
    for i in range(streams):
        s.submit(text_request(lm, "KING.\n", tokens, SamplingParams(seed=i, min_tokens=tokens)))
    start = time.perf_counter()
    while s.has_work():
        s.step()
    return streams * tokens / (time.perf_counter() - start)


def check_server(repository: Path) -> dict:
    from bench.harness import loopback_config
    from serving._proto.stepwise.v1 import inference_pb2 as pb
    from serving.app import create_server
    from serving.client import StepwiseClient

    server, port = create_server(loopback_config(repository, device="cuda"))
    server.start()
    try:
        with StepwiseClient(f"127.0.0.1:{port}", timeout=60) as client:
            providers = {m.name: m.execution_provider for m in client.list_models()}
            tensor = pb.Tensor(dtype="float32", shape=[1, 32, 32], raw_data=bytes(4 * 32 * 32))
            classes = client.stub.Classify(pb.ClassifyRequest(model="lenet5", tensor=tensor))
            text = "".join(client.generate("KING.\n", max_tokens=20, seed=1))
        return {"providers": providers, "classify_top": classes.classes[0].label, "text": text}
    finally:
        server.stop(None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report: dict = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia-* packages, if present
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - reported, the checks go on
            report["preload_dlls"] = repr(exc)

    def section(name, fn):
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - every section reports
            report[name] = {"error": traceback.format_exc(limit=3)}
        print(f"{name} ({time.perf_counter() - t:.1f} s): {report[name]}", flush=True)

    versions = latest_versions(args.repository)
    models = {}

    def load(device):
        out, sessions = {}, SessionFactory(device)
        for name, directory in versions.items():
            models[name, device] = load_model(directory, sessions)
            out[name] = models[name, device].provider
        return out

    section("load_cpu", lambda: load("cpu"))
    section("load_cuda", lambda: load("cuda"))
    section("load_auto", lambda: load_model(versions["lenet5"], SessionFactory("auto")).provider)

    def classifiers():
        out = {}
        x = np.random.default_rng(1).normal(size=(8, 1, 32, 32)).astype(np.float32)
        for (name, device), m in models.items():
            if device == "cuda" and isinstance(m, Classifier):
                shape = (8, *m.input.shape[1:])
                x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
                a, b = m.probabilities(x), models[name, "cpu"].probabilities(x)
                out[name] = {"max_abs_diff_vs_cpu": float(np.max(np.abs(a - b)))}
        return out

    section("classifiers", classifiers)
    lms = {d: models.get(("char_lstm", d)) for d in ("cuda", "cpu")}
    for device, lm in lms.items():
        if lm is None:
            continue
        section(f"step_invariance_{device}", lambda lm=lm: step_invariance(lm))
        section(f"padded_step_invariance_{device}", lambda lm=lm: step_invariance(lm, pad=True))
        section(
            f"engine_invariance_{device}_unpadded", lambda lm=lm: engine_invariance(lm, pad=False)
        )
        section(f"engine_invariance_{device}_padded", lambda lm=lm: engine_invariance(lm, pad=True))
        section(
            f"engine_invariance_{device}_padded_bound",
            lambda lm=lm: engine_invariance(lm, pad=True, bind=True),
        )
        section(
            f"speed_{device}",
            lambda lm=lm: {
                "step_b1_tok_s": step_speed(lm, 1),
                "step_b64_tok_s": step_speed(lm, 64),
                "engine_1_stream_tok_s": engine_speed(lm, 1),
                "engine_64_streams_tok_s": engine_speed(lm, 64),
                "engine_1_stream_bound_tok_s": engine_speed(lm, 1, bind=True),
                "engine_64_streams_bound_tok_s": engine_speed(lm, 64, bind=True),
                "engine_1_stream_padded_to_64_tok_s": engine_speed(lm, 1, pad_to=64),
            },
        )
    if all(lm is not None for lm in lms.values()):

        def greedy_parity():
            params = SamplingParams(temperature=0)
            texts = {
                d: _text(lm, text_request(lm, "KING.\n", 200, params)) for d, lm in lms.items()
            }
            same = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(texts["cuda"], texts["cpu"], strict=False))
                    if a != b
                ),
                200,
            )
            return {"identical_prefix_chars": same, "of": 200}

        section("greedy_cuda_vs_cpu", greedy_parity)
    if ("lenet5", "cuda") in models:
        section("server", lambda: check_server(args.repository))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
