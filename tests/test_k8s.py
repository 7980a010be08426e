"""deploy/k8s, checked offline (no cluster runs here): every overlay renders with
`kubectl kustomize`; every built-in kind validates against the Kubernetes API schema of
one release (kubernetes-validate, strict), every custom kind against the fields its CRD
defines (deploy/k8s/schemas); the server flags in the manifests are the ones
`python -m serving` accepts (parsed by its own parser, after the image's entrypoint);
the probes, ports, names and metric names agree with the server's. The autoscaling
rule's query runs against a real Prometheus in tests/test_deployment.py."""

from __future__ import annotations

import copy
import re
import urllib.request

import kubernetes_validate
import pytest

from bench.harness import loopback_config
from deploy import kube
from serving import __main__ as cli
from serving.api import kserve
from serving.app import SERVICE_NAME, create_server

HEALTH_SERVICES = {"", SERVICE_NAME, kserve.SERVICE_NAME}  # what the server registers
# The Dockerfile stage each server image is built from.
STAGES = {"stepwise-server": "serving", "stepwise-server-gpu": "serving-gpu"}
KINDS = {
    "models": {"PersistentVolumeClaim", "Job"},
    "base": {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim", "Job"},
    "overlays/cpu": {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim",
                     "Job", "HorizontalPodAutoscaler", "ConfigMap"},
    # The KServe pods do not wait for the Job: the claim is applied and filled first.
    "overlays/kserve": {"ServingRuntime", "InferenceService"},
    "overlays/triton": {"InferenceService"},
}  # fmt: skip
KINDS["overlays/gpu"] = KINDS["overlays/cpu"]
KINDS["overlays/prometheus-operator"] = KINDS["overlays/cpu"] | {"ServiceMonitor"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: kube.render(overlay) for overlay in kube.OVERLAYS}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def parse_server_args(argv: list[str]):
    """The namespace `python -m serving` would run with, or a test failure naming the
    flag it refused (argparse exits with status 2)."""
    try:
        return cli.parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"python -m serving refuses {argv}: exit status {exc.code}")


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", kube.OVERLAYS)
def test_every_overlay_renders_and_every_object_validates(rendered, overlay):
    docs = rendered[overlay]
    assert {d["kind"] for d in docs} == KINDS[overlay]
    for doc in docs:
        kube.validate(doc)


def test_the_validators_refuse_what_the_schemas_do_not_allow(rendered):
    """The checks above can fail: a misspelt field, a wrong type or value, in a built-in
    kind and in each custom kind, is refused."""
    server = one(rendered["base"], "Deployment")
    bad = copy.deepcopy(server)
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # ...Seconds
    with pytest.raises(Exception, match="terminationGracePeriod"):
        kube.validate(bad)
    bad = copy.deepcopy(server)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    with pytest.raises(Exception, match="8001"):
        kube.validate(bad)
    runtime = one(rendered["overlays/kserve"], "ServingRuntime")
    bad = copy.deepcopy(runtime)
    bad["spec"]["protocolVersions"] = ["grpc-v3"]
    with pytest.raises(Exception, match="grpc-v3"):
        kube.validate(bad)
    service = one(rendered["overlays/kserve"], "InferenceService")
    bad = copy.deepcopy(service)
    bad["spec"]["predictor"]["model"]["modelFormat"]["nmae"] = "x"
    with pytest.raises(Exception, match="nmae"):
        kube.validate(bad)
    monitor = one(rendered["overlays/prometheus-operator"], "ServiceMonitor")
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["interval"] = "5 seconds"
    with pytest.raises(Exception, match="5 seconds"):
        kube.validate(bad)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # a kind it has no schema for
        kube.validate({"apiVersion": "example.com/v1", "kind": "Foo", "metadata": {"name": "x"}})


@pytest.mark.parametrize("overlay", ["base", "overlays/cpu", "overlays/gpu"])
def test_the_deployment_wires_the_server_its_probes_ports_and_volumes(rendered, overlay):
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    image = container["image"].rsplit(":", 1)[0]
    args = parse_server_args(kube.server_argv(STAGES[image], container["args"]))
    assert (image == "stepwise-server-gpu") == (overlay == "overlays/gpu")
    assert args.device == ("cuda" if overlay == "overlays/gpu" else "cpu")
    if overlay == "overlays/gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == args.port, probe
        assert grpc_probe.get("service", "") in HEALTH_SERVICES, probe
    # The drain: the pod leaves the endpoints within the drain delay, the kubelet waits out
    # drain and grace before SIGKILL, and liveness cannot restart a draining pod.
    drain = args.drain_delay + args.grace_period
    ready = container["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] <= args.drain_delay
    assert pod["spec"]["terminationGracePeriodSeconds"] > drain
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain
    # Clients balancing by DNS reconnect within minutes and so find replicas added since.
    assert args.max_connection_age <= 300
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"

    # Non-root, read-only root filesystem, the repository mounted read-only where the
    # server reads it, from the claim the Job fills.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(args.model_repository)]
    assert models["readOnly"] is True
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes[models["name"]]["persistentVolumeClaim"]["claimName"]
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
    job = one(docs, "Job")["spec"]["template"]["spec"]
    (trainer,) = job["containers"]
    job_volumes = {v["name"]: v for v in job["volumes"]}
    (job_mount,) = trainer["volumeMounts"]
    assert job_volumes[job_mount["name"]]["persistentVolumeClaim"]["claimName"] == claim
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["STEPWISE_MODEL_REPOSITORY"] == job_mount["mountPath"]
    # The server starts once the trainer has written its marker (deploy/trainer.sh).
    (wait,) = pod["spec"]["initContainers"]
    assert f"{args.model_repository}/.complete" in wait["command"][-1]
    assert '"$REPO/.complete"' in (kube.ROOT / "deploy/trainer.sh").read_text()
    assert {m["name"]: m["mountPath"] for m in wait["volumeMounts"]} == {
        models["name"]: str(args.model_repository)
    }

    labels = pod["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance per call
    assert matches(service["spec"]["selector"], labels)
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        "grpc": "grpc",
        "metrics": "metrics",
    }
    assert matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize(
    "overlay", ["overlays/cpu", "overlays/gpu", "overlays/prometheus-operator"]
)
def test_the_autoscaler_scales_the_deployment_on_the_adapter_rules_metric(rendered, overlay):
    docs = rendered[overlay]
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    deployment = one(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA's to set; an apply would reset it
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    (rule,) = kube.adapter_rules()
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    shipped = one(docs, "ConfigMap", "stepwise-adapter-rules")["data"]["config.yaml"]
    assert shipped == kube.ADAPTER_RULES.read_text()
    # The target leaves room below the batch: past --stream-batch-size streams queue.
    args = parse_server_args(kube.server_argv("serving", deployment["spec"]["template"]["spec"]
                                              ["containers"][0]["args"]))  # fmt: skip
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target < args.stream_batch_size


def test_the_service_monitor_scrapes_the_services_metrics_port(rendered):
    docs = rendered["overlays/prometheus-operator"]
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert matches(monitor["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_the_kserve_runtime_runs_the_server_on_the_claim_it_is_given(rendered):
    docs = rendered["overlays/kserve"]
    runtime = one(docs, "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the container KServe mounts storage in
    assert container["command"] == ["python", "-m", "serving"]
    args = parse_server_args(container["args"])
    assert str(args.model_repository) == "/mnt/models"  # where KServe mounts the storageUri
    assert container["ports"] == [{"name": "h2c", "containerPort": args.port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port
    assert runtime["spec"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]

    claim = one(rendered["models"], "PersistentVolumeClaim")["metadata"]["name"]
    predictor = one(docs, "InferenceService")["spec"]["predictor"]
    model = predictor["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"] == f"pvc://{claim}/"

    triton = rendered["overlays/triton"]
    model = one(triton, "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == "kserve-tritonserver" and model["modelFormat"]["name"] == "triton"
    assert model["storageUri"] == f"pvc://{claim}/"


def test_the_metrics_the_autoscaling_rule_reads_are_on_the_servers_page(repository):
    """Every series name the adapter rule selects is one a real server exposes."""
    (rule,) = kube.adapter_rules()
    names = set(re.findall(r"\b(?:stepwise|nv)_\w+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert names == {
        "stepwise_live_streams",
        "nv_inference_pending_request_count",
        "stepwise_stream_slots",
    }
    server, _ = create_server(loopback_config(repository, metrics_port=0))
    server.start()
    try:
        url = f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            page = response.read().decode()
    finally:
        server.stop(None)
    for name in names - {"stepwise_stream_slots"}:
        assert re.search(rf"^{name}\{{.*model=\"char_lstm\".*\}} ", page, re.M), name
    # of the slot gauge, the rule takes the streams waiting (state="waiting") alone
    assert re.search(r'^stepwise_stream_slots\{.*state="waiting".*\} ', page, re.M)
    assert 'state=~"waiting|"' in rule["metricsQuery"]
