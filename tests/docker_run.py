"""`make docker-test`: build the image and run it, then the compose stack, on a private engine.

This machine has no container registry and no Docker engine running, so the script makes its
own: it installs Debian's docker.io, docker-compose and debootstrap if missing, starts dockerd
on a private socket with no bridge, NAT or iptables (containers share the host network and
bind 127.0.0.1 on free ports), debootstraps a Debian base image (cached in .docker-cache/),
fills docker/wheelhouse/ from the host's pip and builds the image with no network at all.
Then it checks the running container as a user would, drains it with SIGTERM, starts the
compose stack's convserve + Prometheus and reads the scrape back through Prometheus's API.
Whatever happens, the engine stops and everything it made is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from tests.docker_engine import Engine, step
from tests.docker_inputs import (
    DOCKER,
    base_tarball,
    empty_wheelhouse,
    fill_wheelhouse,
    install_packages,
)
from tests.manifests import adapter_query, adapter_rules
from tests.support import ROOT, free_port, held_out_digits, metric_value, png_bytes

BASE_IMAGE, IMAGE = "convserve-base:bookworm", "convserve:docker-test"
PROMETHEUS_IMAGE = "convserve-test/prometheus:debian"
STOP_TIMEOUT_S = 40  # CONVSERVE_DRAIN_S (30) + margin, as compose's stop_grace_period
PROMETHEUS_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
RUN mkdir /prometheus && chown 65534:65534 /prometheus
USER 65534:65534
ENTRYPOINT ["/bin/prometheus"]
"""


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.5) -> object:
    """Poll until check() is truthy (connection errors count as not yet); exit after timeout."""
    started = time.monotonic()
    while time.monotonic() < started + timeout:
        with contextlib.suppress(httpx.HTTPError):
            value = check()
            if value:
                print(f"    ok: {what} ({time.monotonic() - started:.0f} s)")
                return value
        time.sleep(every)
    sys.exit(f"FAILED: {what} (waited {timeout:.0f} s)")


def answers(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=5).status_code == 200


def expect(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"FAILED: {what}")
    print(f"    ok: {what}")


def check_predictions(url: str) -> int:
    """digit-4.jpg and 20 held-out digits; returns how many images were classified."""
    example = (ROOT / "docs" / "examples" / "digit-4.jpg").read_bytes()
    response = httpx.post(
        f"{url}/predict", content=example, headers={"content-type": "image/jpeg"}, timeout=30
    )
    expect(response.status_code == 200, "POST /predict digit-4.jpg answers 200")
    top = response.json()["results"][0]["predictions"][0]
    expect(top["label"] == "4", f"digit-4.jpg is a 4 (p={top['probability']:.4f})")
    digits = held_out_digits(20)
    files = [("file", (f"{i}.png", png_bytes(d.image), "image/png")) for i, d in enumerate(digits)]
    results = httpx.post(f"{url}/predict", files=files, timeout=30).json()["results"]
    right = sum(
        r["predictions"][0]["label"] == str(d.label) for r, d in zip(results, digits, strict=True)
    )
    expect(right >= 18, f"{right}/20 held-out digits classified right (multipart)")
    return 1 + len(digits)


def check_drain(engine: Engine, name: str, url: str) -> None:
    """SIGTERM (docker stop) while heatmap requests run: they finish, then the process exits 0."""
    digits = [png_bytes(d.image) for d in held_out_digits(32)]
    files = [("file", (f"{i}.png", digits[i % 32], "image/png")) for i in range(128)]

    def heavy(_: int) -> int:
        return httpx.post(f"{url}/predict?heatmap=gradcam", files=files, timeout=60).status_code

    with ThreadPoolExecutor(3) as pool:
        answers = pool.map(heavy, range(3))

        def inflight() -> float:
            return metric_value(httpx.get(f"{url}/metrics").text, "convserve_inflight_requests")

        wait_for("heatmap requests in flight", inflight, 10, every=0.02)
        started = time.monotonic()
        engine.docker("stop", name, timeout=STOP_TIMEOUT_S + 20)
        stopped = time.monotonic() - started
        statuses = list(answers)
    code = engine.inspect(name, "{{.State.ExitCode}}")
    expect(
        code == "0", f"SIGTERM: exit code {code} after {stopped:.1f} s (limit {STOP_TIMEOUT_S} s)"
    )
    expect(stopped < STOP_TIMEOUT_S, "stopped by its own drain, not killed at the timeout")
    expect(statuses == [200] * 3, f"requests in flight at SIGTERM were answered: {statuses}")
    logs = engine.docker("logs", name)
    expect("drained (all answered)" in logs, "log says: drained (all answered)")


def start(engine: Engine, name: str, *options: str) -> str:
    """Run the image on the host network, on 127.0.0.1 and a free port; returns its URL."""
    port = free_port()
    engine.docker(
        "run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-e", "CONVSERVE_HOST=127.0.0.1", "-e", f"CONVSERVE_PORT={port}",
        "-e", f"CONVSERVE_GRPC_PORT={free_port()}", *options, IMAGE,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}"


def check_container(engine: Engine, tmp: Path) -> None:
    """The image as `docker run` gives it: healthy, right answers, metrics, non-root, drains."""
    name = "convserve-test"
    url = start(engine, name, "--stop-timeout", str(STOP_TIMEOUT_S))
    wait_for("HEALTHCHECK reports healthy", lambda: engine.health(name) == "healthy", 180, 1)
    ready = httpx.get(f"{url}/health/ready", timeout=5)
    expect(ready.status_code == 200, f"GET /health/ready: {ready.text}")
    images = check_predictions(url)
    scrape = httpx.get(f"{url}/metrics", timeout=5).text
    counted = metric_value(scrape, "convserve_images_total", model="digits")
    expect(counted == images, f"/metrics counts the {images} images sent (convserve_images_total)")
    expect(engine.inspect(name, "{{.Config.User}}") == "10001:10001", "image USER 10001:10001")
    status = Path(f"/proc/{engine.inspect(name, '{{.State.Pid}}')}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    expect(uids == ["10001"] * 4, f"the server process runs as uid 10001, not root: {uids}")
    writable = engine.succeeds("exec", name, "touch", "/models/x")
    expect(not writable, "the bundled store /models is read-only to the service")
    memory = engine.docker("stats", "--no-stream", "--format", "{{.MemUsage}}", name)
    print(f"    memory in use: {memory.split('/')[0].strip()}")
    check_drain(engine, name, url)
    engine.docker("rm", name)

    store = tmp / "store"  # a user's own store, mounted read-only over /models
    shutil.copytree(ROOT / "model_store" / "lenet5", store / "lenet5")
    url = start(engine, "convserve-store", "--volume", f"{store}:/models:ro")
    wait_for("own store mounted read-only at /models: ready", answers(f"{url}/health/ready"), 120)
    names = [m["name"] for m in httpx.get(f"{url}/models").json()["models"]]
    expect(names == ["lenet5"], f"the mounted store is what is served: {names}")
    engine.docker("stop", "convserve-store")
    engine.docker("rm", "convserve-store")


@contextlib.contextmanager
def compose_stack(engine: Engine, tmp: Path) -> Iterator[tuple[str, str]]:
    """docker/compose.yaml's convserve + Prometheus (a Debian-built image), host network."""
    context = tmp / "prometheus-image"
    context.mkdir()
    shutil.copy2(shutil.which("prometheus") or "/usr/bin/prometheus", context / "prometheus")
    (context / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE)
    engine.build(context, PROMETHEUS_IMAGE, {"BASE_IMAGE": BASE_IMAGE})
    config = tmp / "prometheus-config"  # the shipped config, only the target port differs
    shutil.copytree(ROOT / "docker" / "prometheus", config)
    port, prometheus_port = free_port(), free_port()
    shipped = (config / "prometheus.yml").read_text()
    expect("convserve:8000" in shipped, "docker/prometheus/prometheus.yml scrapes convserve:8000")
    (config / "prometheus.yml").write_text(shipped.replace("convserve:8000", f"convserve:{port}"))
    env = {
        **os.environ, "DOCKER_HOST": engine.host, "COMPOSE_PROJECT_NAME": "convserve-docker-test",
        "CONVSERVE_IMAGE": IMAGE, "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
        "CONVSERVE_PORT": str(port), "CONVSERVE_GRPC_PORT": str(free_port()),
        "PROMETHEUS_PORT": str(prometheus_port),
        "PROMETHEUS_CONFIG": str(config),
    }  # fmt: skip
    # compose 1.29 refuses published ports on the host network, so the merged file runs
    # without them (they mean nothing there: each service binds 127.0.0.1:<its port> itself)
    files = ["-f", "docker/compose.yaml", "-f", "docker/compose.hostnet.yaml"]
    merged = subprocess.run(
        ["docker-compose", *files, "config"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    stack = yaml.safe_load(merged)
    for service in stack["services"].values():
        if service.get("network_mode") == "host":
            service.pop("ports", None)
    (tmp / "compose.yaml").write_text(yaml.safe_dump(stack))
    compose = ["docker-compose", "-f", str(tmp / "compose.yaml"), "--project-directory", str(ROOT)]
    try:
        subprocess.run(
            [*compose, "up", "-d", "--no-build", "convserve", "prometheus"],
            cwd=ROOT,
            env=env,
            check=True,
        )
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prometheus_port}"
        subprocess.run([*compose, "stop", "convserve"], cwd=ROOT, env=env, check=True)
        code = engine.inspect("convserve-docker-test_convserve_1", "{{.State.ExitCode}}")
        expect(code == "0", f"docker-compose stop: convserve exited {code}")
    finally:
        subprocess.run(
            [*compose, "down", "--volumes", "--timeout", "45"], cwd=ROOT, env=env, check=False
        )


def query(prometheus: str, expr: str) -> list[dict[str, object]]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def check_compose(engine: Engine, tmp: Path) -> None:
    with compose_stack(engine, tmp) as (convserve, prometheus):
        health = engine.health("convserve-docker-test_convserve_1")
        expect(health == "healthy", "compose started Prometheus once convserve was healthy")
        wait_for("Prometheus ready", answers(f"{prometheus}/-/ready"), 60)
        images = check_predictions(convserve)
        up = 'up{job="convserve"} == 1'
        wait_for(f"Prometheus scrapes the container: {up}", lambda: query(prometheus, up), 60)
        count = f'sum(convserve_images_total{{job="convserve"}}) == {images}'
        wait_for(
            f"Prometheus has the service's count: {count}", lambda: query(prometheus, count), 60
        )
        for rule in adapter_rules():  # the HPA's custom metrics, as the adapter would ask
            expr = adapter_query(rule, 'job="convserve"', "instance")
            rows = query(prometheus, expr)
            expect(len(rows) == 1, f"Prometheus adapter query {expr}: {rows}")

        def rules_healthy() -> dict[str, str] | None:  # "unknown" until first evaluated
            groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
            rules = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            return rules if len(rules) >= 6 and set(rules.values()) == {"ok"} else None

        wait_for("alert rules loaded and evaluated, all healthy", rules_healthy, 60)
    print("    grafana: not started (no Grafana image can be had here);")
    print("    its provisioning is checked statically by tests/test_deploy_image.py")


def main() -> None:
    started = time.monotonic()
    with step("packages"):
        install_packages()
    with tempfile.TemporaryDirectory(prefix="convserve-docker-") as name:
        tmp = Path(name)
        with step("base image rootfs (debootstrap --variant=minbase)"):
            tarball = base_tarball(tmp)
        with Engine(DOCKER, tmp / "engine") as engine:
            with step("docker import"):
                engine.docker("import", tarball, BASE_IMAGE)
            with step("wheelhouse (pip download on the host)"):
                fill_wheelhouse()
            with step("docker build (no network)"):
                try:
                    engine.build(ROOT, IMAGE, {"BASE_IMAGE": BASE_IMAGE, "EXTRAS": ""})
                finally:
                    empty_wheelhouse()
            sizes = {image: engine.size(image) for image in (BASE_IMAGE, IMAGE)}
            for image, size in sizes.items():
                print(f"    {image}: {size / 1e6:.0f} MB")
            with step("run the image"):
                check_container(engine, tmp)
            with step("compose stack: convserve + Prometheus"):
                check_compose(engine, tmp)
    took = time.monotonic() - started
    print(f"\ndocker-test passed in {took:.0f} s: image {sizes[IMAGE] / 1e6:.0f} MB", end="")
    print(f" on a {sizes[BASE_IMAGE] / 1e6:.0f} MB Debian base")


if __name__ == "__main__":
    main()
