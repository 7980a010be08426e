"""What one engine iteration costs in process, and where it goes: char_lstm's
`EngineCore` stepped in this thread with N streams of 400 tokens (seeded, temperature
0.8, none ending early), no gRPC.

    python -m bench.engine_iteration --streams 1,16,64

Per iteration: wall and CPU time (ONNX Runtime's pool threads included), the step
graph's own run (`Session.run`), sampling (`sample_rows`), and the rest of the
iteration's Python (scheduling, gathering and scattering state, delivering tokens).
Taking the tokens out of the outboxes, the transport's part (another thread in the
server), is left out of the wall time; the CPU time still holds it.
The bare graph at the same batch (`bench.inprocess`) is the floor.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench import inprocess

ROOT = Path(__file__).resolve().parents[1]


def measure(directory: Path, streams: int, tokens: int = 400) -> dict:
    """Step `streams` generations of `tokens` tokens to their end (after one warm-up
    run); the figures per iteration."""
    import serving.engine.update as update
    from serving.core.models import load_model
    from serving.engine import text_request
    from serving.engine.engine import EngineCore
    from serving.engine.sampler import SamplingParams
    from serving.engine.scheduler import EngineConfig

    model = load_model(directory, "cpu")
    spent = {"graph": 0.0, "sampling": 0.0}

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return run

    session = model.graphs["step"]
    session.run = timed("graph", session.run)
    sample_rows = update.sample_rows
    update.sample_rows = timed("sampling", sample_rows)
    try:
        for length in (50, tokens):  # a warm-up, then the measured run
            core = EngineCore(model, EngineConfig(max_batch_size=max(streams, 8)))
            jobs = [
                # min_tokens: no stream ends early on EOS, so the batch stays N wide
                text_request(
                    model,
                    "KING",
                    length,
                    SamplingParams(temperature=0.8, seed=i, min_tokens=length),
                )
                for i in range(streams)
            ]
            for job in jobs:
                core.submit(job)
            while any(j.status.name != "RUNNING" for j in jobs):  # the prompts, first tokens
                core.step()
            spent.update(graph=0.0, sampling=0.0)
            iterations, wall, cpu, taking = 0, time.perf_counter(), time.process_time(), 0.0
            while core.has_work():
                core.step()
                iterations += 1
                start = time.perf_counter()  # the transport's part, not the engine's
                for job in jobs:
                    job.outbox.take(timeout=0)
                taking += time.perf_counter() - start
            wall, cpu = time.perf_counter() - wall - taking, time.process_time() - cpu
    finally:
        update.sample_rows = sample_rows
    per = 1e6 / iterations
    return {
        "streams": streams,
        "iterations": iterations,
        "wall_us": round(wall * per, 1),
        "cpu_us": round(cpu * per, 1),
        "graph_us": round(spent["graph"] * per, 1),
        "sampling_us": round(spent["sampling"] * per, 1),
        "rest_us": round((wall - spent["graph"] - spent["sampling"]) * per, 1),
        "tokens_per_s": round(iterations * streams / wall),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", default="1,16,64", help="batch sizes, comma-separated")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    directory = args.model_repository / "char_lstm" / "1"
    levels = [int(x) for x in args.streams.split(",")]
    bare = {r["batch"]: r["us_per_call"] for r in inprocess.step_graph(directory, levels, 1.0)}
    print("| streams | iteration wall us | CPU us | graph us | sampling us | rest us "
          "| tokens/s | bare graph us |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for streams in levels:
        r = measure(directory, streams)
        print(
            f"| {streams} | {r['wall_us']:,.0f} | {r['cpu_us']:,.0f} | {r['graph_us']:,.0f} "
            f"| {r['sampling_us']:,.0f} | {r['rest_us']:,.0f} | {r['tokens_per_s']:,} "
            f"| {bare[streams]:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
