"""Model lifecycle under load: swaps, aliases, refused versions, unload, watching, readiness."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.importing import import_torchvision
from service.store import ModelStore
from tests.conftest import app_client
from tests.support import (
    BUNDLED_STORE,
    child_pids,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}
KEY = {"authorization": "Bearer test-key"}


def add_version(store: Path, source: str, version: int) -> Path:
    """Copy a bundled model in as digits/<version>, the way a writer should: rename last."""
    staging = store / "digits" / f".incoming-{version}"
    shutil.copytree(BUNDLED_STORE / source / "1", staging)
    target = store / "digits" / str(version)
    staging.rename(target)
    return target


@asynccontextmanager
async def digits_app(tmp_path: Path, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    store = tmp_path / "store"
    add_version(store, "digits", 1)
    settings = Settings.from_env(
        {"CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": "test-key", **env}
    )
    async with app_client(create_app(settings)) as client:
        yield client


async def answers(
    client: httpx.AsyncClient, bodies: list[bytes], version: int
) -> list[list[float]]:
    """Full probability vectors of each image from one named version."""
    out = []
    for body in bodies:
        response = await client.post(
            f"/predict?version={version}&top_k=10", content=body, headers=PNG
        )
        assert response.json()["model"]["version"] == version
        out.append(by_class(response.json()))
    return out


def by_class(body: dict[str, Any]) -> list[float]:
    probabilities = [0.0] * 10
    for p in body["results"][0]["predictions"]:
        probabilities[p["class_index"]] = p["probability"]
    return probabilities


class Load:
    """Concurrent clients posting until stopped; every response is kept with its send time."""

    def __init__(self, client: httpx.AsyncClient, bodies: list[bytes], query: str = "") -> None:
        self.client, self.bodies, self.query = client, bodies, query
        self.results: list[tuple[float, int, httpx.Response]] = []
        self.stop = asyncio.Event()

    async def _worker(self, offset: int) -> None:
        index = offset
        while not self.stop.is_set():
            body = self.bodies[index % len(self.bodies)]
            sent = time.monotonic()
            response = await self.client.post(
                f"/predict?top_k=10{self.query}", content=body, headers=PNG
            )
            self.results.append((sent, index % len(self.bodies), response))
            index += 1

    @asynccontextmanager
    async def running(self, clients: int = 8) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self._worker(i)) for i in range(clients)]
        try:
            await asyncio.sleep(0.2)
            yield self
            await asyncio.sleep(0.2)
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)


def check_labelled(results: list[tuple[float, int, httpx.Response]],
                   expected: dict[int, list[list[float]]]) -> set[int]:  # fmt: skip
    """Every response is 200 and carries the answer of the version it names."""
    seen = set()
    for _, index, response in results:
        assert response.status_code == 200, response.text
        body = response.json()
        version = body["model"]["version"]
        seen.add(version)
        got = by_class(body)
        want = expected[version][index]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4, (version, index)
    return seen


async def test_version_swap_under_load_loses_nothing(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(12)]
    async with digits_app(tmp_path) as client:
        add_version(tmp_path / "store", "lenet5", 2)  # a different network: different answers
        async with Load(client, bodies).running() as load:
            loaded = await client.post("/models/digits/versions/2/load", headers=KEY)
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["serving_version"] == 2
            await asyncio.sleep(0.3)
            pinned = await client.put("/models/digits/default", json={"version": 1}, headers=KEY)
            assert pinned.json()["serving_version"] == 1
            await asyncio.sleep(0.3)
            reloaded = await client.post("/models/digits/versions/1/reload", headers=KEY)
            assert reloaded.status_code == 200
            await asyncio.sleep(0.3)
            await client.put("/models/digits/default", json={"version": None}, headers=KEY)
        expected = {1: await answers(client, bodies, 1), 2: await answers(client, bodies, 2)}
        assert expected[1] != expected[2]
        assert check_labelled(load.results, expected) == {1, 2}
        assert len(load.results) > 50


async def test_a_version_swapped_in_warms_the_batch_sizes_traffic_formed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a batch of 32 competing with serving for the cores when the traffic forms ones."""
    caplog.set_level(logging.INFO, logger="convserve.catalog")
    body = png_bytes(held_out_digits(1)[0].image)
    async with digits_app(tmp_path) as client:
        assert "model digits v1 warmed up at batch sizes [32, 1]" in caplog.text
        for _ in range(5):  # one at a time: batches of 1
            assert (await client.post("/predict", content=body, headers=PNG)).status_code == 200
        add_version(tmp_path / "store", "lenet5", 2)
        assert (await client.post("/models/digits/versions/2/load", headers=KEY)).status_code == 200
        assert "model digits v2 warmed up at batch sizes [1]" in caplog.text


async def test_aliases_move_atomically(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(8)]
    async with digits_app(tmp_path) as client:
        add_version(tmp_path / "store", "lenet5", 2)
        assert (await client.post("/models/digits/versions/2/load", headers=KEY)).status_code == 200
        await client.put("/models/digits/aliases/canary", json={"version": 1}, headers=KEY)
        async with Load(client, bodies, "&version=canary").running() as load:
            moved = await client.put(
                "/models/digits/aliases/canary", json={"version": 2}, headers=KEY
            )
            switched = time.monotonic()
            assert moved.json()["aliases"] == {"canary": 2}
        expected = {1: await answers(client, bodies, 1), 2: await answers(client, bodies, 2)}
        assert check_labelled(load.results, expected) == {1, 2}
        after = [r for sent, _, r in load.results if sent > switched]
        assert after
        assert {r.json()["model"]["version"] for r in after} == {2}
        gone = await client.delete("/models/digits/aliases/canary", headers=KEY)
        assert gone.json()["aliases"] == {}
        missing = await client.post("/predict?version=canary", content=bodies[0], headers=PNG)
        assert missing.status_code == 404


async def test_corrupted_versions_are_refused_while_the_old_one_serves(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(8)]
    async with digits_app(tmp_path) as client:
        store = tmp_path / "store"
        bad_hash = add_version(store, "digits", 2)
        weights = bad_hash / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
        wrong_shapes = add_version(store, "lenet5", 3)
        spec = wrong_shapes / "model.json"
        digits_spec = json.loads((BUNDLED_STORE / "digits" / "1" / "model.json").read_text())
        spec.write_text(
            json.dumps({**json.loads(spec.read_text()), "architecture": "small_cnn",
                        "arguments": digits_spec["arguments"]})
        )  # fmt: skip
        async with Load(client, bodies).running() as load:
            refused = await client.post("/models/digits/versions/2/load", headers=KEY)
            assert refused.status_code == 422
            assert refused.headers["content-type"] == "application/problem+json"
            assert "the file was changed or corrupted" in refused.json()["detail"]
            shapes = await client.post("/models/digits/versions/3/load", headers=KEY)
            assert shapes.status_code == 422
            assert "weights do not match the architecture" in shapes.json()["detail"]
        assert {r.json()["model"]["version"] for _, _, r in load.results} == {1}
        assert all(r.status_code == 200 for _, _, r in load.results)
        status = (await client.get("/models")).json()["models"][0]
        assert status["serving_version"] == 1
        versions = {v["version"]: v for v in status["versions"]}
        assert versions[2]["status"] == "failed"
        assert versions[3]["status"] == "failed"
        text = (await client.get("/metrics")).text
        assert metric_value(text, "convserve_model_load_failures_total", model="digits") >= 2


async def test_management_needs_the_key(tmp_path: Path) -> None:
    async with digits_app(tmp_path) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": "test-key "}):
            response = await client.get("/store", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await client.get("/store", headers={"x-api-key": "test-key"})).status_code == 200
        listing = (await client.get("/store", headers=KEY)).json()
        assert listing["models"] == [
            {"name": "digits", "versions": [{"version": 1, "status": "ready"}]}
        ]
        for path in (
            "/models/..%2F..%2Fetc/versions/1/load",
            "/models/digits/versions/7/load",
            "/models/%2e%2e/versions/1/load",
        ):
            response = await client.post(path, headers=KEY)
            assert response.status_code == 404, path
        again = await client.post("/models/digits/versions/1/load", headers=KEY)
        assert again.status_code == 409


async def test_management_is_off_without_a_key(client: httpx.AsyncClient) -> None:
    response = await client.post("/models/digits/versions/1/unload", headers=KEY)
    assert response.status_code == 403
    assert "CONVSERVE_API_KEY" in response.json()["detail"]
    assert (await client.get("/models/digits")).status_code == 200


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_unload_frees_the_memory(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    import_torchvision(store, "resnet18", "big", weights=None)
    import_torchvision(store, "resnet18", "big", weights=None, seed=1)
    env = {"CONVSERVE_STORE": str(tmp_path / "store"), "CONVSERVE_API_KEY": "test-key",
           "CONVSERVE_MAX_BATCH_SIZE": "2"}  # fmt: skip
    with running_server(tmp_path, env) as server:
        (pid,) = child_pids(server, "service.modelhost")  # where the weights are
        before = rss_bytes(pid)
        response = httpx.post(f"{server.url}/models/big/versions/2/unload", headers=KEY)
        assert response.status_code == 200
        assert [v["version"] for v in response.json()["versions"]] == [1]
        freed = before - rss_bytes(pid)
        weights = (tmp_path / "store" / "big" / "2" / "weights.safetensors").stat().st_size
        assert freed > 0.6 * weights, f"freed {freed / 2**20:.1f} MiB of {weights / 2**20:.1f} MiB"
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "convserve_model_info", model="big", version="2") == 0


async def test_watching_loads_new_versions_and_reports_broken_ones(tmp_path: Path) -> None:
    bodies = [png_bytes(d.image) for d in held_out_digits(4)]
    async with digits_app(
        tmp_path, CONVSERVE_WATCH="1", CONVSERVE_WATCH_INTERVAL_S="0.1"
    ) as client:
        store = tmp_path / "store"
        (store / "digits" / "5").mkdir()  # no model.json yet: still being written, not a version
        add_version(store, "lenet5", 2)

        async def status() -> dict[str, Any]:
            return (await client.get("/models")).json()["models"][0]  # type: ignore[no-any-return]

        for _ in range(600):  # a load warms up every batch size: allow for a busy machine
            if (await status())["serving_version"] == 2:
                break
            await asyncio.sleep(0.05)
        assert (await status())["serving_version"] == 2
        broken = add_version(store, "digits", 3)
        (broken / "weights.safetensors").write_bytes(b"truncated")
        for _ in range(600):
            versions = {v["version"]: v for v in (await status())["versions"]}
            if 3 in versions:
                break
            await asyncio.sleep(0.05)
        assert versions[3]["status"] == "failed"
        assert "sha256" in versions[3]["error"]
        assert (await status())["serving_version"] == 2
        assert 5 not in versions
        response = await client.post("/predict", content=bodies[0], headers=PNG)
        assert response.json()["model"]["version"] == 2

        # an unload through the API sticks although the version is still in the store
        unloaded = await client.post("/models/digits/versions/2/unload", headers=KEY)
        assert unloaded.status_code == 200
        await asyncio.sleep(1.0)  # ten scans
        assert (await status())["serving_version"] == 1
        assert 2 not in {v["version"] for v in (await status())["versions"]}
        assert (await client.post("/models/digits/versions/2/load", headers=KEY)).status_code == 200
        assert (await status())["serving_version"] == 2


def test_readiness_waits_for_warm_up(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    import_torchvision(store, "resnet18", "big", weights=None)
    seen = []
    with running_server(tmp_path, {"CONVSERVE_STORE": str(tmp_path / "store"),
                                   "CONVSERVE_MAX_BATCH_SIZE": "8"}) as server:  # fmt: skip
        seen.append(httpx.get(f"{server.url}/health/ready").status_code)
        models = httpx.get(f"{server.url}/models").json()["models"]
    assert seen == [200]
    assert models[0]["ready"] is True
    log = server.output()
    assert "model big v1 ready" in log
    # the server answered /health/ready with 503 while resnet18 warmed up at batch sizes 1..8
    assert "GET /health/ready 503" in log
