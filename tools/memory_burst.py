"""What hostile-sized requests cost the server in memory: RSS before, at peak, and after.

    python tools/memory_burst.py [--model-repository DIR] [--rounds 4]

Starts `python -m serving` on a loopback port as a child process (so its memory is
its own), warms it with one ordinary request of each kind, then, round after round:
- a burst of `--images` concurrent classifications of near-limit PNG images
  (`--image-side` pixels square, RGBA, a few hundred KB each: small on the wire, big
  when decoded), on `--classifier`;
- a burst of `--prompts` concurrent generations whose prompts are the maximal
  16,384 characters, each from a client connection of its own, on `--language-model`.
`--images 0` or `--prompts 0` leaves a kind out.
For each burst it prints the server's RSS just before, its peak during the burst (the
kernel's high-water mark, reset before each burst through /proc/PID/clear_refs) and
its RSS two seconds after the burst, and how the requests ended (status codes).
Linux only (/proc). Numbers for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving._proto.stepwise.v1 import inference_pb2 as pb  # noqa: E402
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402
from serving.client import StepwiseClient  # noqa: E402

MB = 1024 * 1024


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def near_limit_png(side: int) -> bytes:
    """A side x side RGBA PNG: a dark digit-like stroke on white, compressing to little."""
    image = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    w = side // 8
    draw.ellipse((side // 4, side // 8, 3 * side // 4, 7 * side // 8), outline=(0, 0, 0, 255),
                 width=w)  # fmt: skip
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def burst(pid: int, n: int, call) -> dict:
    """Run n calls at once; RSS before, peak during and 2 s after, and the status codes."""
    before = proc_status(pid)["VmRSS"]
    reset_peak(pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        codes = Counter(pool.map(lambda i: call(i), range(n)))
    seconds = time.perf_counter() - start
    peak = proc_status(pid)["VmHWM"]
    time.sleep(2.0)
    after = proc_status(pid)["VmRSS"]
    return {"before": before, "peak": peak, "after": after, "seconds": seconds, "codes": codes}


def status_of(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument("--classifier", default="lenet5")
    p.add_argument("--language-model", default="char_lstm")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--image-side", type=int, nargs="+", default=[4000, 6300])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--prompt-chars", type=int, default=16_384)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag")
    args = p.parse_args(argv)

    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--model-repository", str(args.model_repository)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--metrics-port", "0"]
    cmd += args.server_arg
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        target = f"127.0.0.1:{port}"
        with StepwiseClient(target, timeout=120) as client:
            grpc.channel_ready_future(client.channel).result(timeout=120)
            pngs = {side: near_limit_png(side) for side in args.image_side}
            small = near_limit_png(64)
            client.classify(small, args.classifier)
            "".join(client.generate("The ", args.language_model, max_tokens=8))
            print(f"server pid {server.pid}, {' '.join(cmd[1:])}")
            print(f"idle RSS after one request of each kind: "
                  f"{proc_status(server.pid)['VmRSS'] / MB:.0f} MiB")  # fmt: skip
            alphabet = "".join(sorted(set(" the quick brown fox jumps over the lazy dog.\n")))
            prompt = (alphabet * (args.prompt_chars // len(alphabet) + 1))[: args.prompt_chars]

            def classify(data):
                return lambda i: status_of(lambda: client.classify(data, args.classifier))

            # Each prompt comes from a client of its own (its own connection), as the
            # server caps the streams one connection may hold.
            own = [("grpc.use_local_subchannel_pool", 1)]
            channels = [grpc.insecure_channel(target, options=own) for _ in range(args.prompts)]
            request = pb.GenerateRequest(model=args.language_model, prompt=prompt, max_tokens=1)

            def generate(i):
                stub = pb_grpc.InferenceStub(channels[i])
                return status_of(lambda: list(stub.Generate(request, timeout=120)))

            print("| burst | round | RSS before (MiB) | peak (MiB) | after (MiB) | s | statuses |")
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for round_ in range(1, args.rounds + 1):
                rows = []
                for side, data in pngs.items() if args.images else ():
                    name = f"{args.images} x {side}x{side} RGBA PNG ({len(data) // 1024} KB)"
                    rows.append((name, burst(server.pid, args.images, classify(data))))
                if args.prompts:
                    name = f"{args.prompts} x {args.prompt_chars}-character prompt"
                    rows.append((name, burst(server.pid, args.prompts, generate)))
                for name, r in rows:
                    codes = ", ".join(f"{k} {v}" for k, v in sorted(r["codes"].items()))
                    mb = [f"{r[k] / MB:.0f}" for k in ("before", "peak", "after")]
                    row = [name, str(round_), *mb, f"{r['seconds']:.1f}", codes]
                    print("| " + " | ".join(row) + " |")
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.seek(0)
        errors = log.read()
        bad = [line for line in errors.splitlines() if re.search(r"Traceback|ERROR|Error", line)]
        if bad:
            print("server errors:", *bad[:10], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
