"""What hostile-sized requests cost the server in memory: RSS before, at peak, and after.

    python -m bench.memory_burst [--model-repository DIR] [--rounds 4]
    python -m bench.memory_burst --images 0 --prompts 0 --infer-batches 64 8000 \\
        --infer-prompt-tokens 16384 100000 --streams 1 4 --memory-limit 3G --fresh-server

Starts `python -m serving` on a loopback port as a child process (so its memory is
its own), warms it with one ordinary request of each kind, then, round after round:
- a burst of `--images` concurrent classifications of near-limit PNG images
  (`--image-side` pixels square, RGBA, a few hundred KB each: small on the wire, big
  when decoded), on `--classifier`;
- a burst of `--prompts` concurrent generations whose prompts are the maximal
  16,384 characters, each from a client connection of its own, on `--language-model`;
- KServe `ModelInfer` bursts (issue 17) of `--infer-requests` concurrent requests: a
  batch of each `--infer-batches` size on `--infer-classifier`, and `tokens [1, T]` for
  each `--infer-prompt-tokens` T on `--infer-prompt-model` (a prefill graph, with zero
  state sent explicitly);
- KServe `ModelStreamInfer` bursts from clients that never read: for each `--streams`
  count, that many streams (a connection each) send `--stream-requests` requests of
  `--stream-request-mib` MiB each and read nothing for `--stream-hold` seconds; then
  they read what they are given and close. `--stream-payload tensor` fills the MiB
  with one input batch (past max_batch_size once past 64 rows: the server must read it
  to refuse it), `id` sends the largest allowed batch and the rest as the request's
  `id`, which every answer echoes (an allowed request with a MiB-sized answer).
`--images 0` or `--prompts 0` leaves a kind out; the new kinds are out unless asked for.
For each burst it prints the server's RSS just before, its peak during the burst (the
kernel's high-water mark, reset before each burst through /proc/PID/clear_refs), at
its end (for streams: after the unread hold) and two seconds after, and how the
requests ended (status codes). `--memory-limit 3G` runs the server in a memory cgroup
of its own (v2's memory.max, or v1's memory.limit_in_bytes) as a container would; a
server killed there (SIGKILL, the cgroup's oom_kill count) is a FAILED line and exit
status 1. `--fresh-server` gives each burst a server of its own, so one OOM kill ends
only that burst. `--server-root DIR` runs the server from another checkout (a "before").
Linux only (/proc); --memory-limit needs root. Numbers for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from bench import harness
from bench.harness import memory, reset_peak
from serving._proto.inference import grpc_service_pb2 as kpb
from serving._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc
from serving.client import StepwiseClient
from serving.core.card import ModelCard, TensorSpec
from serving.core.repository import latest_versions

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
# A connection of its own per channel, and no client-side cap on message sizes (a
# stream's answers may be as big as its requests).
OWN = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
KSERVE_TYPES = {"float32": "FP32", "int64": "INT64"}


class PeakWatch:
    """The highest VmHWM seen while the block runs, sampled every 50 ms: the peak stays
    known when the process is killed before the burst ends."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, memory(self.pid)["VmHWM"])
            if self._stop.wait(0.05):
                self.peak = max(self.peak, memory(self.pid)["VmHWM"])  # the last word
                return

    def __enter__(self) -> PeakWatch:
        reset_peak(self.pid)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def parse_bytes(text: str) -> int:
    """'3G', '512M', '1.5GiB' or a plain number of bytes (binary units)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 3G or 512M")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


class MemoryCgroup:
    """A memory cgroup of its own, as a container's: cgroup v2 (`memory.max`) where
    the unified hierarchy has the memory controller, else v1's memory controller
    (`memory.limit_in_bytes`). Swap is capped too where the kernel accounts it, so
    going past the limit is an OOM kill, not paging."""

    def __init__(self, limit: int, name: str):
        self.limit = limit
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+memory")
            self.version, self.path = 2, v2 / name
            self.path.mkdir()
            self._write_limits(["memory.max", "memory.swap.max"], [str(limit), "0"])
        elif (v1 / "memory.limit_in_bytes").exists():
            self.version, self.path = 1, v1 / name
            self.path.mkdir()
            names = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            self._write_limits(names, [str(limit), str(limit)])
        else:
            raise SystemExit("--memory-limit: no memory cgroup here (neither v2 nor v1)")

    def _write_limits(self, names: list[str], values: list[str]) -> None:
        (self.path / names[0]).write_text(values[0])
        try:  # absent, or refused, where swap is not accounted
            (self.path / names[1]).write_text(values[1])
        except OSError:
            pass

    def join(self) -> None:
        """Move the calling process into the group (a child's preexec_fn: before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / events).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def peak(self) -> int | None:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        path = self.path / name
        return int(path.read_text()) if path.exists() else None

    def describe(self) -> str:
        knob = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        return f"cgroup v{self.version} {self.path} ({knob} {self.limit / MB:.0f} MiB)"

    def remove(self) -> None:
        for _ in range(50):  # the last task may still be leaving
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"could not remove {self.path}", file=sys.stderr)


class Server:
    """`python -m serving` as a child process on a loopback port, in a memory cgroup of
    its own when `--memory-limit` is given, run from `--server-root` (its cwd and
    PYTHONPATH)."""

    def __init__(self, args, number: int):
        self.root, self.cgroup = args.server_root.resolve(), None
        if args.memory_limit:
            name = f"stepwise-memory-burst-{os.getpid()}-{number}"
            self.cgroup = MemoryCgroup(args.memory_limit, name)
            print(f"server memory limit: {self.cgroup.describe()}")
        env = {**os.environ, "PYTHONPATH": str(self.root)}
        self.log = tempfile.TemporaryFile("w+")
        repository = args.model_repository.resolve()
        # Not waited for here: main() waits (a server that never answers is a FAILED line)
        self.child = harness.start(
            ["--model-repository", str(repository), "--device", "cpu", *args.server_arg],
            ready=None, cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=self.log,
            text=True, preexec_fn=self.cgroup.join if self.cgroup else None,
        )  # fmt: skip
        self.proc, self.pid, self.target = self.child.proc, self.child.pid, self.child.target
        self.cmd = self.proc.args

    def death(self) -> str | None:
        """Why the server is gone, or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
        if self.cgroup is not None:
            kills = self.cgroup.oom_kills()
            how += f"; {kills} OOM kill(s) in its cgroup of {self.cgroup.limit / MB:.0f} MiB"
        return how

    def stop(self) -> list[str]:
        """Stop the server and remove its cgroup; a FAILED line if it had died (errors in
        its log are printed)."""
        died = self.death()
        failures = [f"FAILED: server pid {self.pid} {died}"] if died else []
        if not died:
            self.child.stop(timeout=15)
        if self.cgroup is not None:
            peak = self.cgroup.peak()
            if peak is not None:
                print(f"cgroup peak usage (page cache included): {peak / MB:.0f} MiB")
            self.cgroup.remove()
        self.log.seek(0)
        lines = self.log.read().splitlines()
        bad = [line for line in lines if re.search(r"Traceback|ERROR|Error", line)]
        if bad:
            print("server errors:", *bad[:10], sep="\n  ")
        return failures


@dataclass
class Burst:
    name: str
    warm: Callable[[str], None]  # target -> one ordinary request of this kind
    run: Callable[[int, str], dict]  # (server pid, target) -> the row's figures


def status_of(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def burst(pid: int, n: int, call) -> dict:
    """Run n calls at once; RSS before, peak during, at the end and 2 s after, and the
    status codes."""
    before = memory(pid)["VmRSS"]
    start = time.perf_counter()
    with PeakWatch(pid) as watch:
        with ThreadPoolExecutor(n) as pool:
            codes = Counter(pool.map(lambda i: call(i), range(n)))
        seconds = time.perf_counter() - start
        end = memory(pid)["VmRSS"]
    peak = watch.peak
    time.sleep(2.0)
    after = memory(pid)["VmRSS"]
    return {
        "before": before,
        "peak": peak,
        "end": end,
        "after": after,
        "seconds": seconds,
        "codes": codes,
    }


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


def stepwise_bursts(args) -> list[Burst]:
    """Issue 11's bursts on the stepwise protocol: near-limit images and prompts."""
    bursts = []
    small = near_limit_png(64)

    def warm_classify(target):
        with StepwiseClient(target, timeout=120) as client:
            client.classify(small, args.classifier)

    for side in args.image_side if args.images else ():
        data = near_limit_png(side)

        def classify(pid, target, data=data):
            with StepwiseClient(target, timeout=120) as client:
                call = lambda i: status_of(lambda: client.classify(data, args.classifier))  # noqa: E731
                return burst(pid, args.images, call)

        name = f"{args.images} x {side}x{side} RGBA PNG ({len(data) // 1024} KB)"
        bursts.append(Burst(name, warm_classify, classify))
    if args.prompts:
        alphabet = "".join(sorted(set(" the quick brown fox jumps over the lazy dog.\n")))
        prompt = (alphabet * (args.prompt_chars // len(alphabet) + 1))[: args.prompt_chars]
        request = pb.GenerateRequest(model=args.language_model, prompt=prompt, max_tokens=1)

        def warm_generate(target):
            with StepwiseClient(target, timeout=120) as client:
                "".join(client.generate("The ", args.language_model, max_tokens=8))

        def generate(pid, target):
            # Each prompt comes from a client of its own (its own connection), as the
            # server caps the streams one connection may hold.
            channels = [grpc.insecure_channel(target, options=OWN) for _ in range(args.prompts)]
            stubs = [pb_grpc.InferenceStub(c) for c in channels]
            try:
                call = lambda i: status_of(lambda: list(stubs[i].Generate(request, timeout=120)))  # noqa: E731
                return burst(pid, args.prompts, call)
            finally:
                for c in channels:
                    c.close()

        name = f"{args.prompts} x {args.prompt_chars}-character prompt"
        bursts.append(Burst(name, warm_generate, generate))
    return bursts


def card(repository: Path, model: str) -> ModelCard:
    """The served version's typed model card."""
    return ModelCard.read(latest_versions(Path(repository))[model])


def infer_request(model: str, arrays: dict[str, np.ndarray], **fields) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, **fields)
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=KSERVE_TYPES[array.dtype.name])
        tensor.shape.extend(array.shape)
        little = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
        request.raw_input_contents.append(little.tobytes())
    return request


def classifier_input(spec: TensorSpec, batch: int, rng) -> np.ndarray:
    """`batch` rows of a classifier's input, standard-normal (finite, as ModelInfer asks)."""
    shape = [batch, *spec.shape[1:]]
    return rng.standard_normal(shape, dtype=np.float32)


def prefill_inputs(graph: ModelCard, parent: ModelCard, length: int, rng) -> dict[str, np.ndarray]:
    """tokens [1, length] from the parent model's vocabulary, and zero state [1, ...]."""
    arrays = {"tokens": rng.integers(0, len(parent.vocab), (1, length), dtype=np.int64)}
    for spec in graph.inputs[1:]:
        arrays[spec.name] = np.zeros([1, *spec.shape[1:]], spec.dtype)
    return arrays


def infer_bursts(args) -> list[Burst]:
    """ModelInfer with big batches and long prompts: past the limits and just within."""
    rng = np.random.default_rng(0)
    repository, n = args.model_repository, args.infer_requests
    shots = []  # (name, model, small request, request)
    if args.infer_batches:
        spec = card(repository, args.infer_classifier).inputs[0]
        one = {spec.name: classifier_input(spec, 1, rng)}
        small = infer_request(args.infer_classifier, one)
        for batch in args.infer_batches:
            x = classifier_input(spec, batch, rng)
            shape = ",".join(map(str, x.shape))
            name = f"ModelInfer {n} x {args.infer_classifier} [{shape}] ({x.nbytes / MB:.1f} MiB)"
            shots.append((name, small, infer_request(args.infer_classifier, {spec.name: x})))
    if args.infer_prompt_tokens:
        graph = card(repository, args.infer_prompt_model)
        parent = card(repository, graph.graph_of.model)
        small = infer_request(args.infer_prompt_model, prefill_inputs(graph, parent, 8, rng))
        for length in args.infer_prompt_tokens:
            arrays = prefill_inputs(graph, parent, length, rng)
            name = f"ModelInfer {n} x {args.infer_prompt_model} tokens [1,{length}]"
            shots.append((name, small, infer_request(args.infer_prompt_model, arrays)))

    bursts = []
    for name, small, request in shots:

        def warm(target, small=small):
            with grpc.insecure_channel(target, options=OWN) as channel:
                kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(small, timeout=120)

        def run(pid, target, request=request):
            channels = [grpc.insecure_channel(target, options=OWN) for _ in range(n)]
            stubs = [kpb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            try:
                timeout = args.timeout
                call = lambda i: status_of(lambda: stubs[i].ModelInfer(request, timeout=timeout))  # noqa: E731
                return burst(pid, n, call)
            finally:
                for c in channels:
                    c.close()

        bursts.append(Burst(name, warm, run))
    return bursts


def sequence_step(model: str, key: int, start: bool, end: bool) -> kpb.ModelInferRequest:
    request = infer_request(model, {"tokens": np.asarray([[3]], np.int64)})
    request.parameters["sequence_id"].uint64_param = key
    request.parameters["sequence_start"].bool_param = start
    request.parameters["sequence_end"].bool_param = end
    return request


def sequence_bursts(args) -> list[Burst]:
    """`--sequences` server-held sequences started (one step each) while
    `--sequence-company` Generate streams keep the model's batch full, then all ended:
    what idle sequences pin (each kept a view of the whole batch's state array)."""
    if not args.sequences:
        return []
    model, n = args.sequence_model, args.sequences

    def warm(target):
        with grpc.insecure_channel(target, options=OWN) as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            stub.ModelInfer(sequence_step(model, 1, True, True), timeout=60)

    def run(pid, target):
        # 8 streams a connection: a server before issue 17 refused a connection's ninth
        channels = [
            grpc.insecure_channel(target, options=OWN)
            for _ in range(1 + (args.sequence_company - 1) // 8)
        ]
        stub = kpb_grpc.GRPCInferenceServiceStub(channels[0])
        request = pb.GenerateRequest(model=model, prompt="KING.\n", max_tokens=4096)
        company = [
            pb_grpc.InferenceStub(channels[i // 8]).Generate(request, timeout=600)
            for i in range(args.sequence_company)
        ]
        readers = ThreadPoolExecutor(max(1, len(company)))
        running = [readers.submit(lambda c=call: status_of(lambda: list(c))) for call in company]
        time.sleep(1.0)  # the batch is full
        if any(r.done() for r in running):
            raise SystemExit("a company stream ended early: the batch is not full")
        keys = range(1_000_000, 1_000_000 + n)

        def step(key, start, end):
            return status_of(lambda: stub.ModelInfer(sequence_step(model, key, start, end)))

        before = memory(pid)["VmRSS"]
        start = time.perf_counter()
        with PeakWatch(pid) as watch, ThreadPoolExecutor(args.sequence_clients) as pool:
            codes = Counter(pool.map(lambda k: step(k, True, False), keys))
        seconds, live = time.perf_counter() - start, memory(pid)["VmRSS"]
        with ThreadPoolExecutor(16) as pool:
            codes.update(f"end {c}" for c in pool.map(lambda k: step(k, False, True), keys))
        for call in company:
            call.cancel()
        readers.shutdown(wait=True)
        for channel in channels:
            channel.close()
        time.sleep(2.0)
        after = memory(pid)["VmRSS"]
        return {"before": before, "peak": watch.peak, "end": live, "after": after,
                "seconds": seconds, "codes": codes}  # fmt: skip

    name = f"{n} sequences of {model} started beside {args.sequence_company} streams, then ended"
    return [Burst(name, warm, run)]


def stream_request(args, payload: str, rng) -> tuple[kpb.ModelInferRequest, str]:
    """One `--stream-request-mib` MiB request of `payload` kind, and its description."""
    spec = card(args.model_repository, args.stream_model).inputs[0]
    row_bytes = classifier_input(spec, 1, rng).nbytes
    size = args.stream_request_mib * MB
    if payload == "tensor":
        x = classifier_input(spec, max(1, size // row_bytes), rng)
        request = infer_request(args.stream_model, {spec.name: x})
        return request, f"{args.stream_model} batch {len(x)}"
    x = classifier_input(spec, args.stream_batch, rng)
    pad = max(0, size - x.nbytes)
    request = infer_request(args.stream_model, {spec.name: x}, id="x" * pad)
    return request, f"{args.stream_model} batch {len(x)} + {pad / MB:.2f} MiB id"


def stream_burst(pid: int, target: str, streams: int, args, request) -> dict:
    """`streams` ModelStreamInfer streams (a connection each) send their requests and
    read nothing for `--stream-hold` s; then each reads all it is given. Outcomes: the
    answers (OK, or error_message) and each stream's final status."""
    before = memory(pid)["VmRSS"]
    sent = [0] * streams
    codes: Counter = Counter()
    lock = threading.Lock()

    def requests(i):
        for _ in range(args.stream_requests):
            yield request
            sent[i] += 1  # grpc took it and asked for the next

    def drain(call):
        answers, final = Counter(), "OK"
        try:
            for answer in call:
                answers["error_message" if answer.error_message else "OK"] += 1
        except grpc.RpcError as err:
            final = err.code().name
        with lock:
            codes.update(answers)
            codes[f"stream {final}"] += 1

    channels = [grpc.insecure_channel(target, options=OWN) for _ in range(streams)]
    start = time.perf_counter()
    try:
        with PeakWatch(pid) as watch:  # the hold and the reading
            timeout = args.stream_hold + args.timeout
            stubs = [kpb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            calls = [s.ModelStreamInfer(requests(i), timeout=timeout) for i, s in enumerate(stubs)]
            time.sleep(args.stream_hold)
            end, taken = memory(pid)["VmRSS"], sum(sent)
            with ThreadPoolExecutor(streams) as pool:
                list(pool.map(drain, calls))
    finally:
        for c in channels:
            c.close()
    seconds = time.perf_counter() - start
    time.sleep(2.0)
    after = memory(pid)["VmRSS"]
    total = streams * args.stream_requests
    note = f"{taken} of {total} requests handed to the client's gRPC by the hold's end"
    return {
        "before": before,
        "peak": watch.peak,
        "end": end,
        "after": after,
        "seconds": seconds,
        "codes": codes,
        "note": note,
    }


def stream_bursts(args) -> list[Burst]:
    rng = np.random.default_rng(1)
    bursts = []
    for payload in args.stream_payload if args.streams else ():
        request, what = stream_request(args, payload, rng)
        spec = card(args.model_repository, args.stream_model).inputs[0]
        small = infer_request(args.stream_model, {spec.name: classifier_input(spec, 1, rng)})

        def warm(target, small=small):
            with grpc.insecure_channel(target, options=OWN) as channel:
                stub = kpb_grpc.GRPCInferenceServiceStub(channel)
                list(stub.ModelStreamInfer(iter([small]), timeout=120))

        for streams in args.streams:
            mib = request.ByteSize() / MB
            name = (
                f"ModelStreamInfer {streams} x {args.stream_requests} x {mib:.1f} MiB "
                f"({what}), unread {args.stream_hold:g} s"
            )

            def run(pid, target, streams=streams, request=request):
                return stream_burst(pid, target, streams, args, request)

            bursts.append(Burst(name, warm, run))
    return bursts


def row(name: str, round_: int, r: dict) -> str:
    outcomes = [f"{k} {v}" for k, v in sorted(r["codes"].items())]
    if "note" in r:
        outcomes.append(r["note"])
    mib = [f"{r[k] / MB:.0f}" if r[k] else "gone" for k in ("before", "peak", "end", "after")]
    cells = [name, str(round_), *mib, f"{r['seconds']:.1f}", "; ".join(outcomes)]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    p.add_argument(
        "--server-root",
        type=Path,
        default=ROOT,
        help="the checkout whose `serving` runs (default: this one)",
    )
    p.add_argument("--memory-limit", type=parse_bytes, help="e.g. 3G: the server's cgroup")
    p.add_argument("--fresh-server", action="store_true", help="a server for each burst")
    p.add_argument("--timeout", type=float, default=300, help="seconds per KServe call")
    p.add_argument("--classifier", default="lenet5")
    p.add_argument("--language-model", default="char_lstm")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--image-side", type=int, nargs="+", default=[4000, 6300])
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--prompt-chars", type=int, default=16_384)
    p.add_argument("--infer-classifier", default="resnet18")
    p.add_argument("--infer-batches", type=int, nargs="*", default=[])
    p.add_argument("--infer-prompt-model", default="char_lstm_prefill")
    p.add_argument("--infer-prompt-tokens", type=int, nargs="*", default=[])
    p.add_argument("--infer-requests", type=int, default=1, help="concurrent, per burst")
    p.add_argument("--stream-model", default="lenet5")
    p.add_argument("--streams", type=int, nargs="*", default=[], help="a burst per count")
    p.add_argument("--stream-requests", type=int, default=40, help="per stream")
    p.add_argument("--stream-request-mib", type=int, default=16)
    p.add_argument("--stream-payload", nargs="+", choices=("id", "tensor"), default=["id"])
    p.add_argument("--stream-batch", type=int, default=64, help="rows of an `id` request")
    p.add_argument("--stream-hold", type=float, default=10.0, help="seconds unread")
    p.add_argument("--sequences", type=int, default=0, help="server-held sequences to start")
    p.add_argument("--sequence-model", default="char_lstm")
    p.add_argument("--sequence-company", type=int, default=63, help="Generate streams beside")
    p.add_argument(
        "--sequence-clients",
        type=int,
        default=1,
        help="sequences started at once (1: each in an iteration of its own)",
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag")
    args = p.parse_args(argv)
    # `timeout` and `kill` send SIGTERM: stop the server and remove its cgroup first
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    bursts = stepwise_bursts(args) + infer_bursts(args) + stream_bursts(args)
    bursts += sequence_bursts(args)
    groups = [[b] for b in bursts] if args.fresh_server else [bursts]
    failures = []
    columns = ["burst", "round", "RSS before (MiB)", "peak (MiB)", "at end (MiB)"]
    columns += ["after (MiB)", "s", "statuses"]
    for number, group in enumerate(groups):
        server = Server(args, number)
        try:
            server.child.wait_ready(timeout=120)
            for b in group:
                b.warm(server.target)
            print(f"server pid {server.pid} in {server.root}: {' '.join(server.cmd[1:])}")
            idle = memory(server.pid)["VmRSS"]
            print(f"idle RSS after one request of each kind: {idle / MB:.0f} MiB")
            print("| " + " | ".join(columns) + " |")
            print("| --- " * len(columns) + "|")
            for round_, b in itertools.product(range(1, args.rounds + 1), group):
                print(row(b.name, round_, b.run(server.pid, server.target)), flush=True)
                if server.death():
                    break
        except harness.NotReady:
            failures.append(f"FAILED: server pid {server.pid} never answered")
        except grpc.RpcError as err:  # a warm-up request
            failures.append(f"FAILED: warm-up: {err.code().name} {err.details()}")
        finally:
            failures += server.stop()
    for line in failures:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
