"""Health and model listing over real HTTP, in-process and as a real `convserve serve` process."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support import running_server

pytestmark = pytest.mark.anyio


async def test_live_and_ready(client: httpx.AsyncClient) -> None:
    live = await client.get("/health/live")
    assert live.status_code == 200
    assert live.json() == {"status": "live", "models": {}}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"digits": True, "lenet5": True}}


async def test_models_lists_both_bundled_models(client: httpx.AsyncClient) -> None:
    response = await client.get("/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert set(models) == {"digits", "lenet5"}
    for model in models.values():
        assert model["ready"] is True
        assert model["serving_version"] == 1
        (version,) = model["versions"]
        assert version["status"] == "ready"
        assert version["device"] == "cpu"
    assert models["digits"]["versions"][0]["accuracy"] >= 0.97
    assert models["lenet5"]["versions"][0]["accuracy"] >= 0.96


async def test_unknown_route_is_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/nope")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 404
    assert "no route GET /nope" in body["detail"]
    schema = await client.get("/schema/nope")  # Litestar's own 404 page there, replaced
    assert schema.status_code == 404
    assert schema.headers["content-type"] == "application/problem+json"
    assert "/schema/openapi.json" in schema.json()["detail"]


def test_real_server_is_ready_within_ten_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    with running_server(tmp_path) as server:
        elapsed = time.monotonic() - started
        assert elapsed < 10, f"ready after {elapsed:.1f}s"
        response = httpx.get(f"{server.url}/health/ready")
        assert response.status_code == 200
        assert response.json()["status"] == "ready"
        assert response.headers["x-request-id"]
        models = httpx.get(f"{server.url}/models").json()["models"]
        assert [m["name"] for m in models] == ["digits", "lenet5"]


STABLE_GETS = ["/health/live", "/health/ready", "/models", "/models/digits", "/models/lenet5/1",
               "/v2", "/v2/health/ready", "/v2/models/digits", "/", "/dashboard", "/static/page.js",
               "/schema", "/schema/openapi.json", "/schema/assets/swagger-ui.css"]  # fmt: skip


async def test_head_answers_wherever_get_does(client: httpx.AsyncClient) -> None:
    """The GET's status and headers, no body; where GET is not routed, HEAD is not either."""
    for path in [*STABLE_GETS, "/metrics"]:
        got, head = await client.get(path), await client.head(path)
        assert (head.status_code, got.status_code) == (200, 200), path
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path != "/metrics":  # its body grows with every request
            assert head.headers["content-length"] == got.headers["content-length"], path
    refused = await client.head("/predict")
    assert (refused.status_code, refused.content) == (405, b"")
    assert "POST" in refused.headers["allow"]
    assert "GET" not in refused.headers["allow"]
    assert (await client.head("/nope")).status_code == 404
