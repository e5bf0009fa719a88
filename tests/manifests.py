"""The deploy files as data, for tests/test_deploy.py and tests/docker_run.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.support import ROOT

K8S = ROOT / "docker" / "k8s"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object under docker/k8s/, with the file it came from."""
    return [
        (path, document)
        for path in sorted(K8S.rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def k8s_object(path: Path) -> dict[str, Any]:
    (document,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert isinstance(document, dict)
    return document


def adapter_rules() -> list[dict[str, Any]]:
    """The Prometheus adapter's rules (the ConfigMap's config.yaml)."""
    config = yaml.safe_load(k8s_object(ADAPTER_RULES)["data"]["config.yaml"])
    rules: list[dict[str, Any]] = config["rules"]
    return rules


def adapter_query(rule: dict[str, Any], label_matchers: str, group_by: str) -> str:
    """The PromQL the adapter runs for a rule, its templates filled in as the adapter would."""
    match = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
    assert match, rule["seriesQuery"]
    query: str = rule["metricsQuery"]
    for template, value in (
        ("<<.Series>>", match[0]),
        ("<<.LabelMatchers>>", label_matchers),
        ("<<.GroupBy>>", group_by),
    ):
        query = query.replace(template, value)
    return query
