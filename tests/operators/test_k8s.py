"""deploy/k8s: every manifest valid against the Kubernetes API schemas (kubernetes-validate, offline, strict:
an unknown field is an error), the KEDA and Prometheus Operator kinds against their CRD schemas vendored in
tests/operators/crd_schemas, each kustomization's resource list complete (what `kustomize build` would
emit; `kubectl kustomize` too where kubectl is installed), and the properties that keep jobs alive: probes
on /readyz and /healthz, grace periods above the drains, a GPU pod that drains before it stops."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.dispatcher.harness import ROOT

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = [K8S, K8S / "servicemonitor", K8S / "keda"]
CRD_SCHEMAS = Path(__file__).parent / "crd_schemas"
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# The oldest Kubernetes the manifests are meant for (policy/v1 PDBs, autoscaling/v2 behaviour for KEDA).
K8S_VERSION = "1.29.0"


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def resources(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build directory` emits: its resources with its namespace set."""
    spec = kustomization(directory)
    out = []
    for name in spec["resources"]:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            if spec.get("namespace") and doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = spec["namespace"]
            out.append(doc)
    return out


def one(kind: str, name: str) -> dict[str, Any]:
    found = [
        d
        for directory in KUSTOMIZATIONS
        for d in resources(directory)
        if (d["kind"], d["metadata"]["name"]) == (kind, name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return found


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(ROOT)))
def test_each_kustomization_lists_every_manifest_beside_it(directory):
    spec = kustomization(directory)
    assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    listed = spec["resources"]
    assert len(listed) == len(set(listed))
    on_disk = sorted(p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "a manifest is missing from resources, or listed but absent"
    assert spec["namespace"] == "gpuq"
    keys = [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in resources(directory)]
    assert len(keys) == len(set(keys)), "two objects of one kind with one name"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(ROOT)))
def test_manifests_are_valid_kubernetes_objects(directory):
    for doc in resources(directory):
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            errors = [f"{list(e.path)}: {e.message}" for e in crd_validator(*key).iter_errors(doc)]
            assert not errors, (doc["metadata"]["name"], errors)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {str(exc).splitlines()[0]}")


def test_the_validators_catch_mistakes():
    deployment = one("Deployment", "gpuq-dispatcher")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz"}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = one("ScaledObject", "gpu-service")
    scaled["spec"]["maxReplicas"] = 3  # KEDA calls it maxReplicaCount
    assert list(crd_validator("keda.sh/v1alpha1", "ScaledObject").iter_errors(scaled))
    del scaled["spec"]["maxReplicas"]
    del scaled["spec"]["triggers"][0]["metadata"]
    assert list(crd_validator("keda.sh/v1alpha1", "ScaledObject").iter_errors(scaled))
    monitor = one("ServiceMonitor", "gpuq-dispatcher")
    monitor["spec"]["endpoints"][0]["scrapeInterval"] = "15s"  # it is `interval`
    assert list(crd_validator("monitoring.coreos.com/v1", "ServiceMonitor").iter_errors(monitor))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(ROOT)))
def test_kubectl_kustomize_builds_the_same_objects(directory):
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    docs = list(yaml.safe_load_all(built))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in resources(directory)
    )
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gpuq"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "gpuq"


def config() -> dict[str, str]:
    return one("ConfigMap", "gpuq-dispatcher")["data"]


def test_config_and_secret_hold_known_settings_and_no_real_secret():
    example = (ROOT / ".example.env").read_text()
    secret = one("Secret", "gpuq-dispatcher")["stringData"]
    for key in [*config(), *secret]:
        assert re.search(rf"^#? ?{key}=", example, re.M), f"{key} is not a setting in .example.env"
    assert not set(config()) & set(secret)
    # the dispatcher listens on 0.0.0.0 in a pod: it must have an API token, and the file ships none
    assert {"CALLBACK_SECRET", "API_TOKEN", "BEARER_TOKEN", "DB_PASSWORD"} <= set(secret)
    assert all(value.startswith("replace-with-") for value in secret.values())


def test_dispatcher_probes_drain_and_grace():
    deployment = one("Deployment", "gpuq-dispatcher")
    pod = deployment["spec"]["template"]["spec"]
    main = container(pod, "dispatcher")
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"http": 8000}
    refs = {
        ("ConfigMap", e["configMapRef"]["name"])
        if "configMapRef" in e
        else ("Secret", e["secretRef"]["name"])
        for e in main["envFrom"]
    }
    for kind, name in refs:
        one(kind, name)  # exists in the kustomization
    # SIGTERM after preStop; then the drain (SHUTDOWN_GRACE_SECONDS), the server's stop (grace + 1 s), the
    # dispatch loop's last pass and the requests in flight (grace each): SIGKILL must come after all that
    (pre_stop_wait,) = (int(x) for x in main["lifecycle"]["preStop"]["exec"]["command"][1:])
    grace = float(config()["SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop_wait + 4 * grace + 1
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = pod_labels(deployment)
    service = one("Service", "gpuq-dispatcher")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert config()["CALLBACK_URL"] == f"http://{service['metadata']['name']}.gpuq.svc:8000/callback"
    pdb = one("PodDisruptionBudget", "gpuq-dispatcher")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1
    monitor = one("ServiceMonitor", "gpuq-dispatcher")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert (
        monitor["spec"]["endpoints"][0] | {"port": "http", "path": "/metrics"}
        == monitor["spec"]["endpoints"][0]
    )
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/path"]) == ("true", "/metrics")


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels


def test_gpu_pods_drain_before_keda_scales_them_down():
    deployment = one("Deployment", "gpu-service")
    pod = deployment["spec"]["template"]["spec"]
    pod_labels(deployment)
    scaled = one("ScaledObject", "gpu-service")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert "gpuq_queue_depth" in trigger["metadata"]["query"]
    assert "gpuq_slots_busy" in trigger["metadata"]["query"]  # running jobs count: no scale-down under them
    known = set(re.findall(r"gpuq_[a-z_]+", (ROOT / "dispatcher" / "metrics.py").read_text()))
    assert set(re.findall(r"gpuq_[a-z_]+", trigger["metadata"]["query"])) <= known
    # the sidecar's preStop waits until the GPU's slots are empty, then lets the GPU container stop
    register = container(pod, "gpuq-register")
    drain = " ".join(register["lifecycle"]["preStop"]["exec"]["command"])
    match = re.search(r'gpuq gpu drain "\$POD_NAME" --wait --timeout (\d+)', drain)
    assert match, drain
    assert 'gpuq gpu add "$POD_NAME"' in register["args"][0]
    gpu = container(pod, "gpu")
    assert "/var/run/gpuq/drained" in " ".join(gpu["lifecycle"]["preStop"]["exec"]["command"])
    assert drain.rstrip().endswith("touch /var/run/gpuq/drained")
    # a running job ends by its lease at the latest, so the drain waits that long, and SIGKILL comes later
    lease = float(config()["TASK_TIMEOUT_SECONDS"])
    assert lease < int(match[1]) < pod["terminationGracePeriodSeconds"]
