"""The docker-compose load-testing deployment, without a Docker engine.

`docker-compose config` (Debian's v1 binary) validates docker-compose.yml alone and with
docker-compose.gpu.yml, and the parsed result is checked service by service. Then the
same topology runs as local processes on free loopback ports: two `python -m serving`
replicas, Debian's nginx with a config rendered from the template the compose `lb` uses
(deploy/nginx/stepwise.conf.template), Debian's Prometheus with the compose scrape config
(deploy/prometheus/prometheus.yml) pointed at the two replicas, and `python -m loadtest`
through nginx. .ci/run installs the three packages; elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.render import placeholders, render
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy/nginx/stepwise.conf.template"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/stepwise.json"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape: several scrapes
CLASSIFY = "stepwise.v1.Inference/Classify"
GENERATE = "stepwise.v1.Inference/Generate"


def _needs(*tools: str):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs Debian's {', '.join(missing)} (.ci/run installs them with apt-get)",
    )


def load_yaml(text: str):
    """YAML as Python data: PyYAML when this interpreter has it, else docker-compose's own
    Python, which always has it (Debian's docker-compose depends on python3-yaml)."""
    try:
        import yaml
    except ImportError:
        interpreter = Path(shutil.which("docker-compose")).read_text().split("\n", 1)[0][2:]
        code = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
        out = subprocess.run([interpreter.strip(), "-c", code], input=text, text=True,
                             capture_output=True, timeout=30, check=True)  # fmt: skip
        return json.loads(out.stdout)
    return yaml.safe_load(text)


def compose_config(*files: str) -> dict:
    args = ["docker-compose"] + [a for f in files for a in ("-f", f)] + ["config"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stderr}"
    return load_yaml(proc.stdout)


def _volume(entry) -> str:
    """A service volume as `source:target[:mode]` (the short form, as v1 prints it)."""
    if isinstance(entry, str):
        return entry
    mode = ":ro" if entry.get("read_only") else ""
    return f"{entry['source']}:{entry['target']}{mode}"


def _healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


# -- the compose files ---------------------------------------------------------------------


@_needs("docker-compose")
def test_compose_files_validate_and_wire_the_topology():
    base = compose_config("docker-compose.yml")
    services = base["services"]
    assert set(services) == {"trainer", "server", "lb", "prometheus", "grafana", "loadtest"}
    assert {"models", "prometheus", "grafana"} <= set(base["volumes"])

    trainer = services["trainer"]
    assert trainer["build"]["dockerfile"] == "Dockerfile.train"
    assert [_volume(v) for v in trainer["volumes"]] in (["models:/models"], ["models:/models:rw"])

    server = services["server"]
    assert server["build"]["target"] == "serving"
    assert "ports" not in server, "a fixed host port would stop --scale server=3"
    assert {str(p) for p in server["expose"]} == {"8001", "8002"}
    assert [_volume(v) for v in server["volumes"]] == ["models:/models:ro"]
    assert server["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    check = _healthcheck_text(server)
    assert "grpc_health" in check and "127.0.0.1:8001" in check and "SERVING" in check
    assert server["command"] == ["--device", "cpu"]

    lb = services["lb"]
    assert lb["image"].startswith("nginx:")
    assert [(int(p["published"]), int(p["target"])) for p in lb["ports"]] == [(8001, 8001)]
    assert lb["depends_on"]["server"]["condition"] == "service_healthy"
    assert "/healthz" in _healthcheck_text(lb)
    mounts = [_volume(v) for v in lb["volumes"]]
    assert any(m.endswith(":/etc/nginx/templates/stepwise.conf.template:ro") for m in mounts)
    # The compose environment fills every placeholder of the template the test renders.
    env = {k: str(v) for k, v in lb["environment"].items()}
    assert placeholders(TEMPLATE.read_text()) <= set(env)
    rendered = render(TEMPLATE.read_text(), env)
    assert "server server:8001 resolve" in rendered and "resolver 127.0.0.11" in rendered
    assert re.fullmatch(env["NGINX_ENVSUBST_FILTER"].lstrip("^") + ".*", "STEPWISE_UPSTREAMS")

    # The only published gRPC port is the load balancer's.
    published = {
        name: sorted(int(p["published"]) for p in s.get("ports", []))
        for name, s in services.items()
    }
    assert published == {"trainer": [], "server": [], "lb": [8001], "prometheus": [9090],
                         "grafana": [3000], "loadtest": []}  # fmt: skip

    prometheus = services["prometheus"]
    assert any(
        m.endswith(":/etc/prometheus/prometheus.yml:ro")
        for m in (_volume(v) for v in prometheus["volumes"])
    )
    grafana = [_volume(v) for v in services["grafana"]["volumes"]]
    assert any(m.endswith(":/etc/grafana/provisioning:ro") for m in grafana)
    assert any(m.endswith(":/var/lib/grafana/dashboards:ro") for m in grafana)

    loadtest = services["loadtest"]
    assert loadtest["build"]["target"] == "loadtest"
    assert loadtest["depends_on"]["lb"]["condition"] == "service_healthy"
    assert loadtest["environment"]["TARGET"] == "lb:8001"
    assert any(m.endswith("/results:/results") or m.endswith("/results:/results:rw")
               for m in (_volume(v) for v in loadtest["volumes"]))  # fmt: skip

    gpu = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["services"]["server"]
    assert gpu["command"] == ["--device", "cuda"]
    assert gpu["build"]["target"] == "serving-gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert [_volume(v) for v in gpu["volumes"]] == ["models:/models:ro"]
    assert "ports" not in gpu and _healthcheck_text(gpu) == check


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana's variables filled."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", RATE_INTERVAL))
        for panel in panels
        for target in panel["targets"]
    ]


def test_dashboard_covers_the_figures_per_replica():
    titles = " | ".join(title.lower() for title, _ in dashboard_targets())
    for figure in ("throughput", "p50", "p99", "first token", "inter-token", "batch size",
                   "queue depth", "errors by status code"):  # fmt: skip
        assert figure in titles, figure
    for title, expr in dashboard_targets():
        assert "by (instance" in expr, f"{title}: not per replica: {expr}"
        assert "$" not in expr, f"{title}: a Grafana variable the test does not fill: {expr}"


@_needs("promtool")
def test_prometheus_config_is_valid():
    proc = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = load_yaml(PROMETHEUS_YML.read_text())["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A" and sd["port"] == 8002


# -- the same topology as local processes --------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(what: str, check, timeout: float, interval: float = 0.2):
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, grpc.RpcError, ValueError) as exc:
            last = exc
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout:g} s (last: {last!r})")


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=1
        )
    return status.status == health_pb2.HealthCheckResponse.SERVING


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def requests(self, rpc: str, code: str = "OK") -> float:
        """stepwise_requests_total{rpc, code} from this replica's /metrics."""
        text = _get(f"http://{self.instance}/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("stepwise_requests_total{") and f'rpc="{rpc}"' in line:
                if f'code="{code}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def live_streams(self) -> float:
        """stepwise_live_streams, all models, from this replica's /metrics."""
        text = _get(f"http://{self.instance}/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("stepwise_live_streams{")
        )


@dataclass
class Topology:
    tmp: Path
    replicas: list[Replica]
    lb: str  # nginx's gRPC HOST:PORT
    prometheus: str  # http://HOST:PORT
    procs: list[subprocess.Popen] = field(default_factory=list)

    def query(self, expr: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(_get(url))
        assert body["status"] == "success", body
        return body["data"]["result"]


def nginx_main_conf(tmp: Path, site: Path) -> str:
    """The process-level settings of a foreground nginx that writes only inside `tmp`;
    the site is the compose template, rendered."""
    temp = "\n".join(
        f"    {kind}_temp_path {tmp}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers may write tmp
    return (
        f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log notice;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {tmp}/access.log;\n{temp}\n    include {site};\n}}\n"
    )


def prometheus_config(targets: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml with the replicas as static targets (no Docker
    DNS here) and a 1 s scrape, so a few seconds give rate() its two samples."""
    config = load_yaml(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": targets}]
    return config


def _spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def topology(repository, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deployment")
    procs: list[subprocess.Popen] = []
    try:
        replicas = []
        for i in range(2):
            port, metrics_port = free_port(), free_port()
            log = tmp / f"server{i}.log"
            proc = _spawn(
                [sys.executable, "-m", "serving", "--model-repository", str(repository),
                 "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                 str(metrics_port), "--device", "cpu"],
                log,
            )  # fmt: skip
            procs.append(proc)
            replicas.append(Replica(proc, port, metrics_port, log))
        for r in replicas:
            _until(f"replica {r.target} SERVING ({r.log.read_text()[-2000:]})",
                   lambda r=r: r.proc.poll() is None and _serving(r.target), 90)  # fmt: skip

        lb_port, status_port = free_port(), free_port()
        upstreams = " ".join(f"server {r.target} max_fails=1 fail_timeout=5s;" for r in replicas)
        site = tmp / "stepwise.conf"
        site.write_text(
            render(
                TEMPLATE.read_text(),
                {
                    "STEPWISE_RESOLVER": "127.0.0.1",  # unused: no `resolve` upstreams here
                    "STEPWISE_UPSTREAMS": upstreams,
                    "STEPWISE_GRPC_LISTEN": f"127.0.0.1:{lb_port}",
                    "STEPWISE_STATUS_LISTEN": f"127.0.0.1:{status_port}",
                },
            )
        )
        conf = tmp / "nginx.conf"
        conf.write_text(nginx_main_conf(tmp, site))
        nginx = ["nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
        check = subprocess.run([*nginx, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        procs.append(_spawn([*nginx, "-g", "daemon off;"], tmp / "nginx.out"))
        lb = f"127.0.0.1:{lb_port}"
        _until("nginx /healthz", lambda: _get(f"http://127.0.0.1:{status_port}/healthz"), 20)
        _until("gRPC health through nginx", lambda: _serving(lb), 20)

        prom_port = free_port()
        prom_yml = tmp / "prometheus.yml"
        prom_yml.write_text(json.dumps(prometheus_config([r.instance for r in replicas])))
        procs.append(
            _spawn(
                ["prometheus", f"--config.file={prom_yml}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                tmp / "prometheus.log",
            )
        )  # fmt: skip
        prometheus = f"http://127.0.0.1:{prom_port}"
        _until("Prometheus ready", lambda: "Ready" in _get(f"{prometheus}/-/ready"), 30)
        yield Topology(tmp, replicas, lb, prometheus, procs)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def loadtest(topology: Topology, name: str, *args: str) -> subprocess.Popen:
    """`python -m loadtest` through nginx into tmp/<name>/ (one level, one window)."""
    out = topology.tmp / name
    if "generate" in args:  # prompts in the tiny model's alphabet (tests/conftest.py)
        prompts = topology.tmp / "prompts.txt"
        prompts.write_text("KING.\\nNow is the\nQUEEN.\\nGood night\nFOOL.\\nThe rain\n")
        args = (*args, "--prompts-file", str(prompts))
    return _spawn(
        [sys.executable, "-m", "loadtest", "--target", topology.lb, "--warmup", "0.5",
         "--connect-timeout", "10", "--request-timeout", "20", "--quiet",
         "--output-dir", str(out), *args],
        topology.tmp / f"{name}.log", cwd=ROOT,
    )  # fmt: skip


def finished(topology: Topology, proc: subprocess.Popen, name: str, timeout: float) -> dict:
    """The run's only level, once the generator exits within `timeout` seconds."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"loadtest {name} still running after {timeout:g} s")
    log = (topology.tmp / f"{name}.log").read_text()
    assert proc.returncode == 0, log
    results = json.loads((topology.tmp / name / "results.json").read_text())
    assert (topology.tmp / name / "results.csv").exists()
    (level,) = results["levels"]
    assert (topology.tmp / name / "latency.png").exists() or not level["successes"]
    return level


def classify(target: str, model: str = "lenet5") -> grpc.StatusCode:
    request = pb.ClassifyRequest(model=model, image=_png_digit())
    with grpc.insecure_channel(target) as channel:
        try:
            pb_grpc.InferenceStub(channel).Classify(request, timeout=10)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def _png_digit() -> bytes:
    from loadtest.rpcs import digit_images

    return digit_images(28)[3]


@_needs("nginx", "prometheus")
def test_load_through_nginx_reaches_both_replicas_and_fills_every_panel(topology):
    # A few errors first, so "errors by code" has a series (scraped at least twice).
    for _ in range(4):
        assert classify(topology.lb, model="no_such_model") == grpc.StatusCode.NOT_FOUND
    runs = {
        "classify": loadtest(topology, "classify", "--rpc", "classify", "--concurrency", "4",
                             "--duration", "3"),
        "generate": loadtest(topology, "generate", "--rpc", "generate", "--model", "char_lstm",
                             "--concurrency", "2", "--max-tokens", "48", "--duration", "3"),
    }  # fmt: skip
    levels = {name: finished(topology, proc, name, 60) for name, proc in runs.items()}
    for name, level in levels.items():
        assert level["successes"] > 0 and level["errors"] == {}, (name, level)
    assert levels["generate"]["tokens_per_s"] > 0 and levels["generate"]["ttft_us"]

    # nginx spread the load: each replica answered both RPCs, per its own /metrics.
    for r in topology.replicas:
        assert r.requests(CLASSIFY) > 0, f"{r.target} served no Classify"
        assert r.requests(GENERATE) > 0, f"{r.target} served no Generate"

    # Every panel's expression has data in the real Prometheus (rate() needs two scrapes).
    pending = dict.fromkeys(expr for _, expr in dashboard_targets())
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            if topology.query(expr):
                del pending[expr]
        time.sleep(0.5)
    assert not pending, f"no data in Prometheus for: {list(pending)}"
    throughput = next(expr for title, expr in dashboard_targets() if "Throughput" in title)
    want = {r.instance for r in topology.replicas}
    deadline = time.monotonic() + 30  # each replica's rate() needs two scrapes of its own
    while (instances := {s["metric"]["instance"] for s in topology.query(throughput)}) != want:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert instances == want


@_needs("nginx", "prometheus")
def test_a_replica_killed_mid_run_unary_keeps_succeeding_streams_count_errors(topology):
    victim, survivor = topology.replicas
    before = survivor.requests(CLASSIFY)
    victim_before = victim.requests(CLASSIFY)
    runs = {
        "kill-classify": loadtest(topology, "kill-classify", "--rpc", "classify",
                                  "--concurrency", "4", "--duration", "5"),
        "kill-generate": loadtest(topology, "kill-generate", "--rpc", "generate", "--model",
                                  "char_lstm", "--concurrency", "4", "--max-tokens", "4000",
                                  "--duration", "5"),
    }  # fmt: skip
    # Kill it once the load has reached it and the measurement window has begun.
    _until("load on the victim", lambda: victim.requests(CLASSIFY) > victim_before + 20, 30, 0.1)
    time.sleep(1.0)
    _until("a stream on the victim", lambda: victim.live_streams() > 0, 30, 0.05)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    killed_at = time.monotonic()

    # Unary calls keep succeeding: nginx sends them to the survivor (a refused connection
    # is retried on the next upstream, and the dead one is then skipped for fail_timeout).
    for _ in range(10):
        assert classify(topology.lb) == grpc.StatusCode.OK

    levels = {name: finished(topology, proc, name, 45) for name, proc in runs.items()}
    assert time.monotonic() - killed_at < 40  # no stream hung on the dead replica
    unary = levels["kill-classify"]
    # Only the calls in flight on the victim when it died may fail (nginx does not resend
    # a request body already streamed to it): one per client connection at most.
    assert set(unary["errors"]) <= {"UNAVAILABLE"}, unary
    assert sum(unary["errors"].values()) <= 4 and unary["successes"] > 100, unary
    assert survivor.requests(CLASSIFY) > before + unary["successes"] / 4
    # Streams cut mid-way are errors at the client (nginx cannot retry a started stream).
    streams = levels["kill-generate"]
    assert sum(streams["errors"].values()) > 0, streams
    assert set(streams["errors"]) <= {"UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"}
    assert streams["successes"] > 0  # ... and the survivor's streams went on
