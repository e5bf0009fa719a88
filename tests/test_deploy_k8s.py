"""docker/k8s/ validated offline: every object against its schema, and the parts against each other.

Built-in kinds: kubernetes-validate's strict schemas (unknown fields are errors) for the oldest
and newest Kubernetes versions it knows. Custom resources (ServiceMonitor): the schemas of
@kubernetes-models/prometheus-operator (tests/crds/, installed by `make test` with npm ci).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import metrics
from service.config import Settings
from tests.manifests import (
    ADAPTER_RULES,
    K8S,
    adapter_query,
    adapter_rules,
    k8s_documents,
    k8s_object,
)
from tests.support import ROOT

CRDS = ROOT / "tests" / "crds"
CUSTOM_GROUPS = ("monitoring.coreos.com/",)
VERSIONS = ("1.29", kubernetes_validate.latest_version())


def is_custom(document: dict[str, Any]) -> bool:
    return str(document["apiVersion"]).startswith(CUSTOM_GROUPS)


def validate_custom(documents: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node, "node is not installed: apt-get install nodejs npm (.ci/run does it)"
    assert (CRDS / "node_modules").is_dir(), "run `npm ci --prefix tests/crds` (make test does it)"
    return subprocess.run(
        [node, str(CRDS / "validate.mjs")],
        input=json.dumps(documents),
        capture_output=True,
        text=True,
        check=False,
    )


def pod_spec(path: Path) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object(path)["spec"]["template"]["spec"]
    return spec


def test_builtin_objects_validate_strictly() -> None:
    builtin = [(path, doc) for path, doc in k8s_documents() if not is_custom(doc)]
    kinds = {doc["kind"] for _, doc in builtin}
    assert kinds >= {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"
    }  # fmt: skip
    for path, document in builtin:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(map(str, error.path))
                pytest.fail(f"{path.relative_to(ROOT)} ({version}): {where}: {error.message}")


def test_custom_resources_validate_against_the_operator_schema() -> None:
    custom = [doc for _, doc in k8s_documents() if is_custom(doc)]
    assert {doc["kind"] for doc in custom} == {"ServiceMonitor"}
    result = validate_custom(custom)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("OK ") == len(custom)


def test_the_validators_catch_broken_manifests() -> None:
    """Not a formality: a misspelt field, a wrong type and an unknown kind all fail."""
    deployment = k8s_object(K8S / "deployment.yaml")
    typo = copy.deepcopy(deployment)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(typo, VERSIONS[-1], strict=True)
    monitor = k8s_object(K8S / "servicemonitor.yaml")
    wrong = copy.deepcopy(monitor)
    wrong["spec"]["endpoints"][0]["port"] = 8000
    unknown = {**copy.deepcopy(monitor), "kind": "ServiceMonitr"}
    result = validate_custom([wrong, unknown])
    assert result.returncode == 1
    assert "endpoints/0/port must be string" in result.stdout
    assert "no schema for it" in result.stdout


def test_service_monitor_and_pdb_select_the_deployment() -> None:
    deployment = k8s_object(K8S / "deployment.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = k8s_object(K8S / "service.yaml")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = pod_spec(K8S / "deployment.yaml")["containers"][0]["ports"]
    assert {p["name"]: p["containerPort"] for p in container_ports} == {"http": 8000, "grpc": 8001}
    port, grpc_port = service["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("http", "http")
    assert (grpc_port["targetPort"], grpc_port["appProtocol"]) == ("grpc", "grpc")
    monitor = k8s_object(K8S / "servicemonitor.yaml")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert service["metadata"]["name"] == "convserve", "job label the alert rules expect"
    pdb = k8s_object(K8S / "pdb.yaml")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_probes_drain_and_security_fit_the_service() -> None:
    spec = pod_spec(K8S / "deployment.yaml")
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
    env = {e["name"]: e.get("value") for e in container["env"]}
    drain_s = float(env["CONVSERVE_DRAIN_S"])
    assert drain_s == Settings().drain_s
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain_s + 5
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_hpa_scales_the_deployment_on_metrics_the_adapter_serves() -> None:
    hpa = k8s_object(K8S / "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "convserve"
    }  # fmt: skip
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"convserve_queue_depth", "convserve_inflight_requests"}
    rules = adapter_rules()
    assert {rule["name"]["as"] for rule in rules} == wanted
    exported = metrics.render("")[0].decode()
    for rule in rules:
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}
        }  # fmt: skip
        series = rule["seriesQuery"].split("{")[0]
        assert series == rule["name"]["as"]
        assert f"# TYPE {series} gauge" in exported, f"convserve exports no gauge {series}"


def test_adapter_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the adapter would send it for one pod."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: apt-get install prometheus (.ci/run does it)"
    rules = [
        {
            "record": f"adapter:check:{i}",
            "expr": adapter_query(r, 'namespace="default",pod="p"', "pod"),
        }
        for i, r in enumerate(adapter_rules())
    ]
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ADAPTER_RULES.is_file()


def test_gpu_variant_is_the_cpu_deployment_plus_a_gpu() -> None:
    cpu = k8s_object(K8S / "deployment.yaml")
    gpu = k8s_object(K8S / "gpu" / "deployment.yaml")
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"], "replaces it; HPA and PDB follow"
    spec = gpu["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "CONVSERVE_DEVICE", "value": "cuda"} in container["env"]
    assert container["image"].endswith("-cuda")
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # everything else is the CPU deployment's: probes, drain, security, labels
    for variant in (cpu, gpu):
        pod = variant["spec"]["template"]["spec"]
        pod.pop("tolerations", None)
        (box,) = pod["containers"]
        for key in ("image", "resources", "env"):
            box.pop(key)
    assert gpu == cpu
