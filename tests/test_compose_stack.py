"""The docker-compose deployment on a real Docker engine: `make compose-test` (issue 18).

The images are built (trainer, server, loadtest; nginx and Prometheus too, from Debian's
packages, where their official images cannot be pulled: deploy/docker_engine.py), and
docker-compose.yml runs as written with `--scale server=2`: its healthchecks, its
`depends_on` conditions, its nginx template and Prometheus config. An override file
changes only what a test must: the images built here, a small training budget (two
models), the results folder, host ports on loopback that the engine chooses (no fixed
port can collide with anything), and for the replicas a drain of 1 s, a grace of 2 s and
one stream decoded at a time, so that `docker stop` cuts streams within seconds (the
compose file gives them 30 s). The project name is unique; `down -v` runs at the end,
pass or fail, and the test checks that no container, network or volume of the project
is left.

Not in `make test` (minutes of image builds and training): the `docker` marker. Where no
engine can run (no client, no dockerd, not root), `make compose-test` says why in one
line and runs nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from test_shutdown import Stream

from bench.harness import health_serving, until
from deploy.docker_engine import (
    Engine,
    EngineUnavailable,
    Images,
    build,
    build_images,
    docker_engine,
    remove_images,
)
from deploy.topology import ROOT, get, load_yaml
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.docker

CLASSIFY = "stepwise.v1.Inference/Classify"
GENERATE = "stepwise.v1.Inference/Generate"
MODELS = "lenet5 char_lstm"  # what the loadtest service asks for, by default
BUDGET = ["FLAGS_default_lenet5=--epochs 2",
          "FLAGS_default_char_lstm=--steps 40 --hidden-size 64 --eval-every 40"]  # fmt: skip
DRAIN_S, GRACE_S = 1, 2  # the compose file's server: 5 and 30


@dataclass
class Stack:
    engine: Engine
    project: str
    files: list[str]
    tmp: Path
    images: Images
    env: dict[str, str]
    lb: str = ""  # nginx's gRPC port on the host, HOST:PORT
    prometheus: str = ""  # http://HOST:PORT

    def compose(self, *args: str, timeout: float = 120, check: bool = True):
        cmd = ["docker-compose", "-p", self.project, *(a for f in self.files for a in ("-f", f))]
        proc = subprocess.run([*cmd, *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}:\n{proc.stderr[-3000:]}")
        return proc

    def port(self, service: str, port: int) -> str:
        host, number = self.compose("port", service, str(port)).stdout.strip().rsplit(":", 1)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{number}"

    def replicas(self) -> list[str]:
        """The running `server` containers' ids, in replica order."""
        ids = self.compose("ps", "-q", "server").stdout.split()
        return [i for i in ids if self.inspect(i, "{{.State.Running}}") == "true"]

    def inspect(self, container: str, template: str) -> str:
        return self.engine.run("inspect", "-f", template, container).stdout.strip()

    def instance(self, container: str) -> str:
        """The replica's Prometheus `instance` label: its address on the compose network."""
        ip = self.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}")
        return f"{ip.split()[0]}:8002"

    def held_streams(self, container: str) -> float:
        """Generate/Caption streams holding a slot, decoding or queued for the engine
        (stepwise_stream_slots), from the replica's own /metrics (read inside it)."""
        text = self.engine.run(
            "exec", container, "python", "-c",
            "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8002/metrics').read()"
            ".decode())",
        ).stdout  # fmt: skip
        held = 'stepwise_stream_slots{pool="generate",state="live"}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(held))  # fmt: skip

    def query(self, expr: str) -> dict[str, float]:
        """An instant query as {instance: value}."""
        url = f"{self.prometheus}/api/v1/query?" + f"query={_quote(expr)}"
        body = json.loads(get(url, timeout=30))
        assert body["status"] == "success", body
        return {s["metric"].get("instance", ""): float(s["value"][1])
                for s in body["data"]["result"]}  # fmt: skip

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: self.engine.run(*cmd, "-q", "--filter", label).stdout.split()
            for kind, cmd in (
                ("containers", ("ps", "-a")),
                ("networks", ("network", "ls")),
                ("volumes", ("volume", "ls")),
            )  # fmt: skip
        }


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def override(images: Images, results: Path) -> dict:
    server_cmd = ["--device", "cpu", "--client-id-header", "x-real-ip",
                  "--drain-delay", str(DRAIN_S), "--grace-period", str(GRACE_S),
                  "--stream-batch-size", "1"]  # fmt: skip
    lb: dict = {"image": images.nginx}
    if not images.resolve:  # Debian's nginx 1.22: the replicas are resolved at start
        upstreams = "server server:8001 max_fails=1 fail_timeout=5s;"
        lb["environment"] = {"STEPWISE_UPSTREAMS": upstreams}
    return {
        "version": "3.9",
        "services": {
            "trainer": {"image": images.trainer, "command": BUDGET,
                        "environment": {"STEPWISE_MODELS": MODELS}},
            "server": {"image": images.server, "command": server_cmd},
            "lb": lb,
            "prometheus": {"image": images.prometheus},
            "loadtest": {
                "image": images.loadtest,
                "volumes": [f"{results}:/results"],
                "environment": {"CONCURRENCY": "1,4", "STREAM_CONCURRENCY": "2",
                                "MAX_TOKENS": "32", "WORKERS": "1", "INTERVAL_MS": "1500"},
            },
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    with ExitStack() as cleanup:
        try:
            engine = cleanup.enter_context(docker_engine())
        except EngineUnavailable as exc:
            pytest.skip(f"no Docker engine for the compose test: {exc}")
        started = time.monotonic()
        tag = uuid.uuid4().hex[:8]
        images = build_images(engine, tmp, tag)
        cleanup.callback(remove_images, engine, images)
        print(f"\ncompose-test: images in {time.monotonic() - started:.0f} s; stand-ins: "
              f"{'; '.join(images.standins) or 'none'}", file=sys.stderr)  # fmt: skip
        (tmp / "results").mkdir()
        files = [str(ROOT / "docker-compose.yml"), str(tmp / "override.yml")]
        Path(files[1]).write_text(json.dumps(override(images, tmp / "results"), indent=1))
        env = {
            **engine.env,
            "STEPWISE_LB_PORT": "127.0.0.1:0",
            "STEPWISE_PROMETHEUS_PORT": "127.0.0.1:0",
            "STEPWISE_GRAFANA_PORT": "127.0.0.1:0",
        }
        stack = Stack(engine, f"stepwisetest{tag}", files, tmp, images, env)
        cleanup.callback(_down, stack)
        up = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--scale", "server=2", "lb", "prometheus",
                      timeout=1200)  # fmt: skip
        print(f"compose-test: up (trained, both replicas healthy) in "
              f"{time.monotonic() - up:.0f} s", file=sys.stderr)  # fmt: skip
        stack.lb = stack.port("lb", 8001)
        stack.prometheus = f"http://{stack.port('prometheus', 9090)}"
        until("gRPC health through lb", lambda: health_serving(stack.lb), 60)
        until("Prometheus ready", lambda: "Ready" in get(f"{stack.prometheus}/-/ready"), 60)
        yield stack


def _down(stack: Stack) -> None:
    logs = stack.compose("logs", "--no-color", check=False, timeout=120)
    (stack.tmp / "compose.log").write_text(logs.stdout + logs.stderr)
    stack.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300, check=False)
    left = stack.leftovers()
    assert not any(left.values()), f"left behind by the compose project: {left}"


def test_the_images_hold_what_they_should(stack):
    """The serving image has no torch; the trainer's torch is a CPU build."""
    probe = stack.engine.run(
        "run", "--rm", "--entrypoint", "python", stack.images.server, "-c",
        "import onnxruntime, grpc, numpy, PIL; import torch", check=False,
    )  # fmt: skip
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr, probe.stderr
    cuda = stack.engine.run(
        "run", "--rm", "--entrypoint", ".venv/bin/python", stack.images.trainer, "-c",
        "import torch; print(torch.__version__, torch.version.cuda)",
    ).stdout.split()  # fmt: skip
    assert cuda[1] == "None", f"the trainer's torch is {cuda}"
    # The replicas run as docker-compose.yml (and deploy/k8s) says: not root, on a
    # read-only root filesystem, and serve so (they are healthy: the fixture waited).
    for container in stack.replicas():
        assert stack.engine.run("exec", container, "id", "-u").stdout.strip() == "65532"
        assert stack.inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        wrote = stack.engine.run("exec", container, "touch", "/app/x", check=False)
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr, wrote.stderr


def test_the_loadtest_service_runs_through_lb_and_both_replicas_serve(stack):
    results = stack.tmp / "results"
    run = stack.compose("run", "--rm", "-T", "loadtest", "--duration", "2", "--warmup", "0.5",
                        "--quiet", timeout=600)  # fmt: skip
    assert "loadtest: results in" in run.stdout, run.stdout[-2000:]
    for rpc, levels in (("classify", [1, 4]), ("generate", [2])):
        body = json.loads((results / rpc / "results.json").read_text())
        assert [level["concurrency"] for level in body["levels"]] == levels
        for level in body["levels"]:
            assert level["successes"] > 0 and level["errors"] == {}, (rpc, level)
        assert (results / rpc / "results.csv").read_text().count("\n") == len(levels) + 1
        assert list((results / rpc).glob("*.png")), f"no plot in {results / rpc}"

    # Prometheus found both replicas by Docker's DNS, and each served Classify (calls
    # alternate between replicas). Generate is shown per replica but not required of
    # both: two streams at a time are too few for nginx's rotation to be sure to give
    # each replica one (a run saw 27 and 1).
    want = {stack.instance(c) for c in stack.replicas()}
    assert len(want) == 2
    for rpc in (CLASSIFY, GENERATE):
        expr = f'sum by (instance) (stepwise_requests_total{{rpc="{rpc}",code="OK"}})'

        def both(expr=expr, rpc=rpc):
            v = stack.query(expr)
            return v if rpc != CLASSIFY or (set(v) == want and min(v.values()) > 0) else None

        served = until(f"{rpc} on both replicas in Prometheus", both, 60, 1)
        print(f"compose-test: {rpc} per replica {served}", file=sys.stderr)
    assert sum(served.values()) > 0  # Generate: served at all


def _loadtest(stack: Stack, name: str, *args: str) -> subprocess.Popen:
    out = stack.tmp / name
    log = (stack.tmp / f"{name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--target", stack.lb, "--warmup", "0.5",
         "--connect-timeout", "10", "--request-timeout", "30", "--quiet", "--output-dir",
         str(out), *args],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _level(stack: Stack, proc: subprocess.Popen, name: str) -> dict:
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"loadtest {name} still running after 120 s")
    assert proc.returncode == 0, (stack.tmp / f"{name}.log").read_text()[-3000:]
    (level,) = json.loads((stack.tmp / name / "results.json").read_text())["levels"]
    return level


def _classify_loop(target: str, stop: threading.Event, codes: Counter) -> None:
    from loadtest.rpcs import digit_images

    image = digit_images(28)[3]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        while not stop.is_set():
            try:
                stub.Classify(pb.ClassifyRequest(model="lenet5", image=image), timeout=10)
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[f"{err.code().name}: {err.details()}"] += 1


def test_docker_stop_of_a_replica_mid_run(stack):
    """SIGTERM through `docker stop`: the replica drains and exits 0 within the compose
    file's stop_grace_period; unary calls through lb keep succeeding; the streams it was
    serving end with UNAVAILABLE at the client, as many as the replica says it ended, and
    every other stream finishes."""
    grace = load_yaml(stack.compose("config").stdout)["services"]["server"]["stop_grace_period"]
    stop_grace_s = float(str(grace).rstrip("s"))
    unary = _loadtest(stack, "stop-classify", "--rpc", "classify", "--concurrency", "4",
                      "--duration", "10")  # fmt: skip
    # Streams of our own, not the load generator's: each is followed to its end (a
    # generator cancels the ones still running when its run ends). Each asks for 4,096
    # tokens, no early EOS; a replica decodes one at a time (the override), so most of
    # its streams are still queued when the grace period ends, however fast it decodes.
    channels = [grpc.insecure_channel(stack.lb) for _ in range(4)]
    streams = [Stream(pb_grpc.InferenceStub(channels[i % 4]), seed=i) for i in range(24)]
    for stream in streams:
        stream.start()
    try:
        # The victim: the replica holding the most streams now (its own /metrics;
        # Prometheus is up to a scrape interval behind), once it holds a few.
        victim = until(
            "streams held by a replica",
            lambda: (live := {c: stack.held_streams(c) for c in stack.replicas()})
            and max(live.values()) >= 4 and max(live, key=live.get), 30, 0.2,
        )  # fmt: skip
        stop, codes = threading.Event(), Counter()
        caller = threading.Thread(target=_classify_loop, args=(stack.lb, stop, codes))
        caller.start()
        started = time.monotonic()
        stack.engine.run("stop", "-t", str(int(stop_grace_s)), victim, timeout=stop_grace_s + 30)
        took = time.monotonic() - started
        time.sleep(2)  # calls after the replica is gone, too
        stop.set()
        caller.join(timeout=30)
        for stream in streams:
            stream.join(timeout=120)
            assert not stream.is_alive(), "a stream hung"
    finally:
        for channel in channels:
            channel.close()

    assert stack.inspect(victim, "{{.State.ExitCode}}") == "0"
    assert took < stop_grace_s, f"docker stop took {took:.1f} s"
    # Unary calls keep succeeding: nginx sends new calls to the survivor (a refused or
    # timed-out connect is retried there). A call that reaches the replica at the instant
    # it stops accepting may be answered CANCELLED by gRPC itself, an answer nginx passes
    # on (the call got one): at most one per client connection, and rare.
    failed = {code: n for code, n in codes.items() if code != "OK"}
    assert codes["OK"] > 20 and sum(failed.values()) <= 1, f"Classify through lb: {codes}"
    assert all(code.startswith(("CANCELLED", "UNAVAILABLE")) for code in failed), failed
    level = _level(stack, unary, "stop-classify")
    assert level["successes"] > 100, level
    assert set(level["errors"]) <= {"CANCELLED", "UNAVAILABLE"}, level
    assert sum(level["errors"].values()) <= 4, level  # its four connections

    logs = stack.engine.run("logs", victim)
    ended = sum(int(line.split("ended ")[1].split()[0])
                for line in (logs.stdout + logs.stderr).splitlines()
                if "call(s) still live" in line)  # fmt: skip
    outcomes = Counter(stream.code.name for stream in streams)
    print(f"compose-test: docker stop took {took:.1f} s; Classify {dict(codes)}; streams "
          f"{dict(outcomes)}; the victim ended {ended}", file=sys.stderr)  # fmt: skip
    # Every stream is accounted for: the ones the victim ended read UNAVAILABLE, every
    # other one finished.
    assert ended > 0, "no stream outlived the grace period on the victim"
    assert outcomes == {"OK": len(streams) - ended, "UNAVAILABLE": ended}, outcomes
    for stream in streams:
        if stream.code == grpc.StatusCode.OK:
            assert stream.finish_reason == "length" and len(stream.text) >= 4096
        else:  # ended by the server; gRPC's own words when its cancel at the end won
            assert stream.details in ("Cancelling all calls",) or (
                "the server is shutting down" in stream.details
            ), stream.details


def test_the_gpu_image_builds_and_falls_back_without_a_gpu(stack):
    """`--target serving-gpu` (docker-compose.gpu.yml's image): ONNX Runtime's CUDA
    provider is in it, torch is not; it cannot run CUDA here (no GPU, no NVIDIA container
    toolkit), so the check is what it was built with. Removed afterwards: about 3 GB."""
    free_gb = shutil.disk_usage("/tmp").free / 2**30
    if free_gb < 12:
        pytest.skip(f"the GPU image needs about 8 GB to build; {free_gb:.0f} GB free in /tmp")
    tag = f"stepwise-server-gpu:{stack.project}"
    build(stack.engine, stack.tmp, tag, "--target", "serving-gpu",
          "--build-arg", f"BASE_IMAGE={stack.images.base}")  # fmt: skip
    try:
        probe = stack.engine.run(
            "run", "--rm", "--entrypoint", "python", tag, "-c",
            "import importlib.util as u, onnxruntime as o; "
            "print(' '.join(o.get_available_providers()), u.find_spec('torch') is None)",
        ).stdout.split()  # fmt: skip
        assert "CUDAExecutionProvider" in probe and probe[-1] == "True", probe
    finally:
        stack.engine.run("image", "rm", "--force", tag, check=False, timeout=300)
