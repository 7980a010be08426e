"""The docker-compose load-testing deployment, without a Docker engine.

`docker-compose config` (Debian's v1 binary) validates docker-compose.yml alone and with
docker-compose.gpu.yml, and the parsed result is checked service by service. Then the
same topology runs as local processes on free loopback ports: two `python -m serving`
replicas, Debian's nginx with a config rendered from the template the compose `lb` uses
(deploy/nginx/stepwise.conf.template), Debian's Prometheus with the compose scrape config
(deploy/prometheus/prometheus.yml) pointed at the two replicas, and `python -m loadtest`
through nginx (deploy/topology.py starts them). .ci/run installs the three packages;
elsewhere these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from polling import eventually

from deploy import kube
from deploy.render import placeholders, render
from deploy.topology import (
    NAMESPACE,
    PROMETHEUS_YML,
    ROOT,
    TEMPLATE,
    Topology,
    load_yaml,
    local_topology,
    until,
)
from serving._proto.stepwise.v1 import inference_pb2 as pb
from serving._proto.stepwise.v1 import inference_pb2_grpc as pb_grpc

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


def test_the_dockerfiles_import_checks_name_modules_that_exist():
    """The loadtest image checked `import hdrhistogram`, a module the package does not
    have (it is `hdrh`), so the image could not be built anywhere (issue 18). Every
    module a Dockerfile's check imports must import here, where the same extras are."""
    import importlib.util
    import re

    checks = []
    for dockerfile in ("Dockerfile", "Dockerfile.train"):
        text = (ROOT / dockerfile).read_text()
        for negated, modules in re.findall(r'(!\s*)?python -c "import ([\w., ]+)"', text):
            checks += [(m.strip(), bool(negated)) for m in modules.split(",")]
    assert ("hdrh", False) in checks and ("torch", True) in checks
    missing = [m for m, negated in checks if not negated and not importlib.util.find_spec(m)]
    assert not missing, f"Dockerfile checks import modules that do not exist: {missing}"


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
    assert server["command"] == ["--device", "cpu", "--client-id-header", "x-real-ip"]
    # Not root, a read-only root filesystem: as deploy/k8s runs the image.
    assert server["user"] == "65532:65532" and server["read_only"] is True
    assert server["tmpfs"] == ["/tmp"]

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
    assert gpu["command"] == ["--device", "cuda", "--client-id-header", "x-real-ip"]
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


@pytest.fixture(scope="module")
def topology(repository, tmp_path_factory):
    with local_topology(repository, tmp_path_factory.mktemp("deployment")) as topology:
        yield topology


def loadtest(topology: Topology, name: str, *args: str) -> subprocess.Popen:
    """`python -m loadtest` through nginx into tmp/<name>/ (one level, one window)."""
    if "generate" in args:  # prompts in the tiny model's alphabet (tests/conftest.py)
        prompts = topology.tmp / "prompts.txt"
        prompts.write_text("KING.\\nNow is the\nQUEEN.\\nGood night\nFOOL.\\nThe rain\n")
        args = (*args, "--prompts-file", str(prompts))
    return topology.loadtest(name, *args)


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
def test_the_autoscaling_rule_gives_each_replica_a_series_that_rises_with_load(topology):
    """deploy/k8s's prometheus-adapter rule, for the HPA's per-pod metric: its seriesQuery
    finds both replicas, and its metricsQuery, filled as the adapter fills it for a
    request about both pods, returns one series per replica from the real Prometheus:
    0 while idle, above 0 under Generate load through nginx, never above the streams the
    load holds, and 0 again once it ends. (Before the test that kills a replica.)"""
    (rule,) = kube.adapter_rules()
    pods = [r.pod for r in topology.replicas]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    query = kube.fill_metrics_query(
        rule["metricsQuery"], series=series, group_by="pod",
        label_matchers=kube.pods_matchers(NAMESPACE, pods),
    )  # fmt: skip

    def by_pod() -> dict[str, float]:
        return {s["metric"]["pod"]: float(s["value"][1]) for s in topology.query(query)}

    assert {s["metric"]["pod"] for s in topology.query(rule["seriesQuery"])} == set(pods)
    idle = dict.fromkeys(pods, 0.0)
    assert eventually(lambda: by_pod() == idle, 30), by_pod()  # earlier tests' streams end
    streams = 8
    run = loadtest(
        topology, "autoscaling", "--rpc", "generate", "--model", "char_lstm",
        "--concurrency", str(streams), "--max-tokens", "400", "--duration", "6",
    )  # fmt: skip
    peak = dict(idle)
    while run.poll() is None:
        for pod, value in by_pod().items():
            peak[pod] = max(peak[pod], value)
        time.sleep(0.25)
    level = finished(topology, run, "autoscaling", 60)
    assert level["successes"] > 0 and level["errors"] == {}, level
    assert set(peak) == set(pods) and all(0 < v <= streams for v in peak.values()), peak
    assert eventually(lambda: by_pod() == idle, 30), by_pod()


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
    until("load on the victim", lambda: victim.requests(CLASSIFY) > victim_before + 20, 30, 0.1)
    time.sleep(1.0)
    until("a stream on the victim", lambda: victim.live_streams() > 0, 30, 0.05)
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
    # a request body already streamed to it): one per client connection at most, which the
    # client reads as UNAVAILABLE (nginx's 502) or, less often, INTERNAL (a clean-clone CI
    # run saw one: nginx reset the call rather than answer it).
    assert set(unary["errors"]) <= {"UNAVAILABLE", "INTERNAL"}, unary
    assert sum(unary["errors"].values()) <= 4 and unary["successes"] > 100, unary
    assert survivor.requests(CLASSIFY) > before + unary["successes"] / 4
    # Streams cut mid-way are errors at the client (nginx cannot retry a started stream).
    streams = levels["kill-generate"]
    assert sum(streams["errors"].values()) > 0, streams
    assert set(streams["errors"]) <= {"UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED"}
    assert streams["successes"] > 0  # ... and the survivor's streams went on


@_needs("nginx", "prometheus")
def test_the_compose_loadtest_script_sweeps_through_the_lb_into_results(topology, tmp_path):
    """deploy/loadtest.sh, the compose `loadtest` service's entrypoint, through nginx:
    both sweeps run and leave JSON, CSV and PNG in $RESULTS/<rpc>/."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("KING.\\nNow is the\nQUEEN.\\nGood night\n")  # the tiny model's alphabet
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",  # its `python`
        "TARGET": topology.lb, "RESULTS": str(tmp_path / "results"),
        "CONCURRENCY": "1,2", "STREAM_CONCURRENCY": "2", "MAX_TOKENS": "24", "WORKERS": "1",
    }  # fmt: skip
    proc = subprocess.run(
        ["sh", str(ROOT / "deploy/loadtest.sh"), "--duration", "1.5", "--warmup", "0.3",
         "--prompts-file", str(prompts), "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rpc, levels in (("classify", [1, 2]), ("generate", [2])):
        out = tmp_path / "results" / rpc
        results = json.loads((out / "results.json").read_text())
        assert [level["concurrency"] for level in results["levels"]] == levels
        assert all(level["successes"] > 0 and not level["errors"] for level in results["levels"])
        assert (out / "results.csv").read_text().count("\n") == len(levels) + 1
        assert list(out.glob("*.png")), f"no plot in {out}"
    assert "loadtest: results in" in proc.stdout


def test_the_compose_trainer_skips_training_when_every_default_model_is_there(tmp_path):
    """deploy/trainer.sh reads the default models from the Makefile (as the image runs
    it, from the repository root) and runs `make models` only for a volume missing one:
    a `make` earlier on PATH records what the script asks of it for `models`."""
    makefile_models = re.search(r"^MODELS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    names = makefile_models.group(1).split()
    repo = tmp_path / "models"
    for name in names:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.json").write_text("{}")
    shim = tmp_path / "bin"
    shim.mkdir()
    real_make = shutil.which("make")
    builds = (  # `make models MODELS=... REPO=...`: exports what it is asked for
        'repo=${3#REPO=}; for m in ${2#MODELS=}; do mkdir -p "$repo/$m/1"; '
        'echo {} > "$repo/$m/1/model.json"; done'
    )
    (shim / "make").write_text(
        "#!/bin/sh\n"
        f'case "$1" in models) echo "$@" > {tmp_path}/asked; {builds}; exit 0;; esac\n'
        f'exec {real_make} "$@"\n'
    )
    (shim / "make").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}",
           "STEPWISE_MODEL_REPOSITORY": str(repo)}  # fmt: skip
    env.pop("STEPWISE_MODELS", None)

    def trainer() -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(ROOT / "deploy/trainer.sh")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    done = trainer()
    assert done.returncode == 0, done.stderr
    assert "nothing to train" in done.stdout and " ".join(names) in done.stdout
    assert not (tmp_path / "asked").exists()
    assert (repo / ".complete").read_text().split() == names  # what deploy/k8s waits for
    (repo / names[-1] / "1" / "model.json").unlink()  # a half-filled volume
    (repo / ".complete").unlink()
    again = trainer()
    assert again.returncode == 0, again.stderr
    assert f"building {names[-1]} into {repo}" in again.stdout
    asked = (tmp_path / "asked").read_text().split()
    assert asked == ["models", f"MODELS={names[-1]}", f"REPO={repo}", "CKPT=/tmp/checkpoints"]
    assert (repo / ".complete").read_text().split() == names
    (repo / names[-1] / "1" / "model.json").unlink()
    (shim / "make").write_text(  # training fails: no marker
        f'#!/bin/sh\ncase "$1" in models) exit 3;; esac\nexec {real_make} "$@"\n'
    )
    failed = trainer()
    assert failed.returncode == 3 and not (repo / ".complete").exists()
    (shim / "make").write_text(  # make says it succeeded, but a model is still missing
        f'#!/bin/sh\ncase "$1" in models) exit 0;; esac\nexec {real_make} "$@"\n'
    )
    short = trainer()
    assert short.returncode == 1 and f"{names[-1]} is still missing" in short.stderr
    assert not (repo / ".complete").exists()
    empty = subprocess.run(["sh", str(ROOT / "deploy/trainer.sh")], cwd=ROOT,
                           env={**env, "STEPWISE_MODELS": " "}, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert empty.returncode == 1 and "no models to build" in empty.stderr
