"""A real Prometheus scrapes a live convserve: every dashboard query and alert returns data.

Prometheus comes from the Debian package (.ci/run installs it); it runs on 127.0.0.1 with a
1 s scrape interval and the alert rules from docker/prometheus/alerts.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import (
    ARTIFACTS,
    BUNDLED_STORE,
    ROOT,
    free_port,
    held_out_digits,
    png_bytes,
    running_server,
)

DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "convserve.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", '"$model"': '".+"'}
THRESHOLD = re.compile(r"^(?P<query>.*?)\s*(?:>|<|>=|<=|==|!=)\s*[-+0-9.e]+\s*$", re.DOTALL)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `apt-get install prometheus` (.ci/run does it)"
    return path


@dataclass
class Stack:
    convserve: str
    prometheus: str
    client_latencies: list[float]  # seconds, sequential lenet5 requests
    lenet5_requests: int

    def query(self, expr: str) -> list[dict[str, object]]:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        # a plain-text 503 while Prometheus starts: an HTTPError, which wait_for() polls past
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float:
        (sample,) = self.query(expr)
        value = sample["value"]
        assert isinstance(value, list)
        return float(value[1])


def start_prometheus(tmp: Path, target: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "convserve", "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(what)


def drive_traffic(url: str) -> tuple[list[float], int]:
    """Sequential lenet5 requests (timed by the client) plus mixed concurrent digits traffic."""
    pictures = [png_bytes(d.image) for d in held_out_digits(137)]
    # every lenet5 request a new image (each is computed, not a response cache hit); the digits
    # traffic repeats 40 (hits and misses both); `unseen` ones miss the digits model's cache
    sequential, digits, unseen = pictures[:120], pictures[:40], pictures[120:]
    png = {"content-type": "image/png"}
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for body in sequential:
            started = time.perf_counter()
            response = client.post("/models/lenet5/predict", content=body, headers=png)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200

        def mixed(index: int) -> int:
            body = digits[index % len(digits)]
            if index % 10 == 0:
                return client.post(
                    "/predict?heatmap=gradcam", content=body, headers=png
                ).status_code
            if index % 17 == 0:
                return client.post("/predict", content=b"not an image", headers=png).status_code
            if index % 23 == 0:
                return client.post("/predict?model=nope", content=body, headers=png).status_code
            return client.post("/predict", content=body, headers=png).status_code

        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(mixed, range(400)))
        files = [("file", (f"{i}.png", body, "image/png")) for i, body in enumerate(unseen)]
        statuses.append(client.post("/predict", files=files).status_code)  # over the queue: 503
    assert {200, 400, 404, 503} <= set(statuses)
    return latencies, len(sequential)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server of the bundled models (digits with a copy as v2 in shadow, so the rollout panels
    have data; a sample of the traffic captured) scraped by a real Prometheus."""
    tmp = tmp_path_factory.mktemp("prometheus")
    store = tmp / "store"
    shutil.copytree(BUNDLED_STORE, store)
    shutil.copytree(store / "digits" / "1", store / "digits" / "2")
    env = {"CONVSERVE_MAX_QUEUE": "16", "CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": "k",
           "CONVSERVE_CAPTURE_DIR": str(tmp / "captured"),
           "CONVSERVE_CAPTURE_RATE": "0.2"}  # fmt: skip
    with running_server(tmp, env) as server:
        shadow = httpx.put(f"{server.url}/models/digits/rollout", headers={"X-API-Key": "k"},
                           json={"version": 2, "mode": "shadow"}, timeout=30)  # fmt: skip
        assert shadow.status_code == 200, shadow.text
        target = server.url.removeprefix("http://")
        process, prometheus = start_prometheus(tmp, target)
        try:
            stack = Stack(server.url, prometheus, [], 0)
            wait_for(lambda: stack.query('up{job="convserve"} == 1'), 60, "first scrape")
            stack.client_latencies, stack.lenet5_requests = drive_traffic(server.url)
            time.sleep(3)  # three more scrapes carry the final counts
            yield stack
        finally:
            process.terminate()
            process.wait(timeout=30)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, query with Grafana's variables filled in, legend format) for every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    targets = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            targets.append((panel["title"], expr, target.get("legendFormat", "")))
    return targets


def dashboard_queries() -> list[tuple[str, str]]:
    return [(title, expr) for title, expr, _ in dashboard_targets()]


def alert_rules() -> list[dict[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 12
    empty = [(title, expr) for title, expr in queries if not stack.query(expr)]
    assert not empty, f"panels without data: {empty}"


def test_dashboard_covers_what_operators_need() -> None:
    titles = " | ".join(title for title, _ in dashboard_queries()).lower()
    for needed in (
        "request rate",
        "error ratio",
        "p50 / p95 / p99",
        "queue wait vs inference",
        "batch size",
        "queue depth",
        "in-flight",
        "confidence",
        "model info",
        "response cache",
        "captured for review",
        "shadow rollout",
    ):
        assert needed in titles


def test_every_alert_expression_returns_data(stack: Stack) -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ConvserveHighErrorRate",
        "ConvserveHighLatencyP99",
        "ConvserveQueueNearFull",
        "ConvserveModelNotReady",
    }
    for rule in rules:
        match = THRESHOLD.match(rule["expr"])
        assert match, f"{rule['alert']}: expected '<query> <op> <threshold>'"
        assert stack.query(match["query"]), f"{rule['alert']}: {match['query']} returned nothing"
    loaded = httpx.get(f"{stack.prometheus}/api/v1/rules").json()["data"]["groups"]
    health = {r["name"]: r["health"] for g in loaded for r in g["rules"]}
    assert set(health) == {r["alert"] for r in rules}
    assert set(health.values()) == {"ok"}


def test_counts_and_latency_agree_with_the_client(stack: Stack) -> None:
    sent = stack.scalar('sum(convserve_requests_total{model="lenet5"})')
    assert sent == stack.lenet5_requests
    client_p50 = statistics.median(stack.client_latencies)
    client_p99 = sorted(stack.client_latencies)[int(0.99 * len(stack.client_latencies)) - 1]
    # all lenet5 traffic is this test's: the cumulative buckets hold exactly its latencies
    server = 'sum by (le) (convserve_request_duration_seconds_bucket{model="lenet5"})'
    p50 = stack.scalar(f"histogram_quantile(0.5, {server})")
    p99 = stack.scalar(f"histogram_quantile(0.99, {server})")
    # the server measures less than the client (no network, no client), and buckets interpolate
    assert 0.2 * client_p50 <= p50 <= 1.25 * client_p50, (p50, client_p50)
    assert p99 <= 1.5 * client_p99 + 0.005, (p99, client_p99)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "latency-agreement.json").write_text(json.dumps(
        {"client_p50": client_p50, "server_p50": p50, "client_p99": client_p99, "server_p99": p99}
    ))  # fmt: skip


def test_batching_is_visible_in_prometheus(stack: Stack) -> None:
    mean = stack.scalar(
        'sum(convserve_batch_size_sum{model="digits"})'
        ' / sum(convserve_batch_size_count{model="digits"})'
    )
    assert mean > 1.0


def test_promtool_checks_config_rules_and_unit_tests() -> None:
    promtool = tool("promtool")
    for args in (
        ["check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(DOCKER / "prometheus" / "alerts_test.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def fill_legend(legend: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: {{name}} becomes the series' label value."""
    return re.sub(r"\{\{(\w+)\}\}", lambda match: labels.get(match[1], ""), legend)


def test_render_the_dashboard_queries_as_a_picture(stack: Stack) -> None:
    """Grafana cannot be installed here, so the panels' own queries are plotted instead
    (artifacts/dashboard.png; docs/observability.md shows a copy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[tuple[str, str]]] = {}
    for title, expr, legend in dashboard_targets():
        panels.setdefault(title, []).append((expr, legend))
    plotted = [t for t in panels if t not in ("Model info", "Batch size distribution")]
    end = time.time()
    figure, axes = plt.subplots(3, 4, figsize=(20, 11))
    for axis, title in zip(axes.flat, plotted, strict=False):
        points = 0
        for expr, legend in panels[title]:
            response = httpx.get(
                f"{stack.prometheus}/api/v1/query_range",
                params={
                    "query": expr.replace("[1m]", "[5s]"),
                    "start": end - 40,
                    "end": end,
                    "step": 1,
                },
            ).json()
            for series in response["data"]["result"]:
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                points += len(xs)
                label = fill_legend(legend, series["metric"])
                axis.plot(xs, ys, label=label[:40])
        assert points >= 2, f"{title}: nothing to plot"
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds ago", fontsize=8)
        axis.legend(fontsize=6)
    for axis in list(axes.flat)[len(plotted) :]:
        axis.axis("off")
    figure.tight_layout()
    ARTIFACTS.mkdir(exist_ok=True)
    figure.savefig(ARTIFACTS / "dashboard.png", dpi=70)
    plt.close(figure)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
