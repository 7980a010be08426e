"""A/B two or more servers on this machine, in alternating runs, from one command.

    python -m bench.ab_servers --rounds 4 base=/tmp/base new=.
    python -m bench.ab_servers --rounds 4 pool=. "one=.:--intra-op-threads 1"

Each variant is NAME=TREE[:SERVER FLAGS]: `python -m serving` started from TREE (a
checkout, e.g. a `git worktree` of an older commit) with the flags, against this
repository's model repository. Every round starts each variant in turn (the order
flips every round, so drift on shared cores falls on both), loads it with
`python -m loadtest` (Generate char_lstm at 16 streams, then Classify lenet5 at one
client) and stops it. Prints every run, then each variant's mean and its ratio to the
first variant: throughput and the server's CPU per unit of work (its process CPU time,
ONNX Runtime's threads included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parents[1]

LOADS = {
    "generate": (
        ["--rpc", "generate", "--model", "char_lstm", "--concurrency", "16", "--duration", "8",
         "--warmup", "2", "--max-tokens", "256"],
        ("tokens_per_s", "server_cpu_s_per_1k_tokens"),
    ),
    "classify": (
        ["--rpc", "classify", "--model", "lenet5", "--input-data", "digits", "--concurrency",
         "1", "--duration", "5", "--warmup", "1"],
        ("throughput_rps", "server_cpu_s_per_request"),
    ),
}  # fmt: skip


def one_run(tree: str, flags: list[str], repository: Path, out: Path) -> dict[str, dict]:
    # Run from `tree` (its cwd comes first on the server's sys.path), ready when health
    # says SERVING, stopped at the end of the block.
    with harness.start(
        ["--model-repository", str(repository), *flags], name=f"server from {tree}",
        metrics_port=harness.free_port(), cwd=tree, stop_timeout=60,
    ) as server:  # fmt: skip
        figures = {}
        for load, (args, _) in LOADS.items():
            subprocess.run(
                [sys.executable, "-m", "loadtest", "--target", server.target,
                 "--wait-healthy", "60", "--quiet", "--server-pid", str(server.pid),
                 "--output-dir", str(out / load), *args],
                cwd=ROOT, stdout=subprocess.DEVNULL, check=True,
            )  # fmt: skip
            figures[load] = json.loads((out / load / "results.json").read_text())["levels"][0]
        return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", metavar="NAME=TREE[:FLAGS]")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    variants = {}
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        tree, _, flags = rest.partition(":")
        variants[name] = (str(Path(tree).resolve()), flags.split())
    runs: dict[str, list] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in order:
                tree, flags = variants[name]
                figures = one_run(tree, flags, args.model_repository, Path(tmp) / name)
                runs[name].append(figures)
                shown = ", ".join(
                    f"{load} {key} {figures[load][key]:.4g}"
                    for load, (_, keys) in LOADS.items()
                    for key in keys
                )
                print(f"round {r} {name}: {shown}", flush=True)
    first = next(iter(variants))
    print(f"\nmeans of {args.rounds} runs each (ratio to {first}):")
    for name in variants:
        cells = []
        for load, (_, keys) in LOADS.items():
            for key in keys:
                mean = statistics.fmean(run[load][key] for run in runs[name])
                base = statistics.fmean(run[load][key] for run in runs[first])
                cells.append(f"{load} {key} {mean:.4g} ({mean / base:.2f}x)")
        print(f"  {name}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
