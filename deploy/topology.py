"""The docker-compose load-testing deployment as local processes, without a Docker engine.

    with local_topology(Path("model_repository"), tmp) as topology:
        topology.loadtest("classify", "--rpc", "classify", "--duration", "5").wait()
        topology.query("sum by (instance) (rate(stepwise_requests_total[10s]))")

The compose services, one process each on free loopback ports: `python -m serving`
replicas (compose's `server`), Debian's nginx with a site rendered from the template the
compose `lb` uses (deploy/nginx/stepwise.conf.template, through deploy/render.py),
Debian's Prometheus with the compose scrape config (deploy/prometheus/prometheus.yml)
pointed at the replicas, and `python -m loadtest` through nginx (compose's `loadtest`).
Every process gets a session of its own and everything written goes under one temporary
folder; leaving the context stops them all, the load first, on success and on error.
tests/test_deployment.py and tools/dashboard_snapshot.py both run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import harness
from bench.harness import free_port, health_serving, stop, until
from deploy.render import render

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy/nginx/stepwise.conf.template"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"


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


def get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


# The namespace the replicas' series carry in the local Prometheus, as Kubernetes service
# discovery labels a pod's (deploy/k8s: the autoscaling rule selects by it).
NAMESPACE = "stepwise"


@dataclass
class Replica:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    pod: str = ""  # its `pod` label in the local Prometheus

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def instance(self) -> str:
        """Its Prometheus `instance` label: the metrics HOST:PORT."""
        return f"127.0.0.1:{self.metrics_port}"

    def requests(self, rpc: str, code: str = "OK") -> float:
        """stepwise_requests_total{rpc, code} from this replica's /metrics."""
        text = get(f"http://{self.instance}/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith("stepwise_requests_total{") and f'rpc="{rpc}"' in line:
                if f'code="{code}"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def live_streams(self) -> float:
        """stepwise_live_streams, all models, from this replica's /metrics."""
        text = get(f"http://{self.instance}/metrics")
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
    procs: list[subprocess.Popen] = field(default_factory=list)  # stopped last to first

    def _api(self, path: str, **params) -> dict:
        url = f"{self.prometheus}/api/v1/{path}?" + urllib.parse.urlencode(params)
        body = json.loads(get(url, timeout=30))
        if body["status"] != "success":
            raise ValueError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's series: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        return self._api("query", query=expr)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """A range query's series: [{"metric": {labels}, "values": [[t, "v"], ...]}, ...]."""
        return self._api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def prometheus_version(self) -> str:
        return self._api("status/buildinfo")["version"]

    def loadtest(self, name: str, *args: str) -> subprocess.Popen:
        """`python -m loadtest ARGS` through nginx into tmp/<name>/, its output in
        tmp/<name>.log; stopped with the topology if still running."""
        proc = spawn(
            [sys.executable, "-m", "loadtest", "--target", self.lb, "--warmup", "0.5",
             "--connect-timeout", "10", "--request-timeout", "20", "--quiet",
             "--output-dir", str(self.tmp / name), *args],
            self.tmp / f"{name}.log", cwd=ROOT,
        )  # fmt: skip
        self.procs.append(proc)
        return proc


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


def prometheus_config(replicas: list[Replica], scrape_interval: str = "1s") -> dict:
    """deploy/prometheus/prometheus.yml with the replicas as static targets (no Docker
    DNS here) and a short scrape (1 s: a few seconds give rate() its two samples). Each
    target carries the `namespace` and `pod` labels Kubernetes service discovery would
    give it, so the autoscaling rule's query (deploy/k8s) runs here as on a cluster."""
    config = load_yaml(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    (job,) = config["scrape_configs"]
    job.pop("dns_sd_configs")
    job["static_configs"] = [
        {"targets": [r.instance], "labels": {"namespace": NAMESPACE, "pod": r.pod}}
        for r in replicas
    ]
    return config


def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """`args` in a session of its own (so stop() reaches its children too), output to `log`."""
    return harness.spawn(args, log, start_new_session=True, **kwargs)


@contextmanager
def local_topology(
    repository: Path, tmp: Path, replicas: int = 2, scrape_interval: str = "1s"
) -> Iterator[Topology]:
    """Start the deployment serving `repository`, every file under `tmp`; stop it all when
    the block ends, on error too. Raises TimeoutError when a piece never comes up
    (harness.NotReady for a replica)."""
    procs: list[subprocess.Popen] = []
    try:
        servers, started = [], []
        for i in range(replicas):
            metrics_port = free_port()
            log = tmp / f"server{i}.log"
            # No drain delay: nothing here health-checks the replicas to drain them.
            server = harness.start(
                ["--model-repository", str(repository), "--device", "cpu", "--drain-delay",
                 "0", "--client-id-header", "x-real-ip"],
                name=f"replica {i}", metrics_port=metrics_port, log=log, ready=None,
                start_new_session=True,
            )  # fmt: skip
            procs.append(server.proc)
            started.append(server)
            servers.append(
                Replica(server.proc, server.port, metrics_port, log, pod=f"stepwise-server-{i}")
            )
        for server in started:  # they load their models side by side
            server.wait_ready(90)

        lb_port, status_port = free_port(), free_port()
        upstreams = " ".join(f"server {r.target} max_fails=1 fail_timeout=5s;" for r in servers)
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
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t: {check.stderr}")
        procs.append(spawn([*nginx, "-g", "daemon off;"], tmp / "nginx.out"))
        lb = f"127.0.0.1:{lb_port}"
        until("nginx /healthz", lambda: get(f"http://127.0.0.1:{status_port}/healthz"), 20)
        until("gRPC health through nginx", lambda: health_serving(lb), 20)

        prom_port = free_port()
        prom_yml = tmp / "prometheus.yml"
        prom_yml.write_text(json.dumps(prometheus_config(servers, scrape_interval)))
        procs.append(
            spawn(
                ["prometheus", f"--config.file={prom_yml}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                tmp / "prometheus.log",
            )
        )  # fmt: skip
        prometheus = f"http://127.0.0.1:{prom_port}"
        until("Prometheus ready", lambda: "Ready" in get(f"{prometheus}/-/ready"), 30)
        yield Topology(tmp, servers, lb, prometheus, procs)
    finally:
        for proc in reversed(procs):
            stop(proc)
