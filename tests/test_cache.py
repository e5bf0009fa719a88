"""The response cache: an image sent again is answered without a decode or a forward pass, with
the same answer, and never across models, versions or loads."""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from tests.conftest import app_client
from tests.support import (
    BUNDLED_STORE,
    digit_picture,
    held_out_digits,
    metric_value,
    png_bytes,
    running_server,
)
from tests.test_lifecycle import KEY, add_version

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


@asynccontextmanager
async def cache_app(tmp_path: Path, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    """The whole service in this process, on a store of digits v1 and lenet5, management on."""
    store = tmp_path / "store"
    add_version(store, "digits", 1)
    shutil.copytree(BUNDLED_STORE / "lenet5", store / "lenet5")
    settings = Settings.from_env(
        {"CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": "test-key", **env}
    )
    async with app_client(create_app(settings)) as client:
        yield client


class Counts:
    """The counters that tell a cached answer from a computed one."""

    def __init__(self, text: str) -> None:
        self.hits = metric_value(text, "convserve_cache_lookups_total", result="hit")
        self.misses = metric_value(text, "convserve_cache_lookups_total", result="miss")
        self.images = metric_value(text, "convserve_images_total")  # through a forward pass
        self.decoded = metric_value(text, "convserve_preprocess_seconds_count")
        self.entries = metric_value(text, "convserve_cache_entries")

    @classmethod
    async def read(cls, client: httpx.AsyncClient) -> Counts:
        return cls((await client.get("/metrics")).text)

    def since(self, before: Counts) -> tuple[float, float, float, float]:
        return (
            self.hits - before.hits,
            self.misses - before.misses,
            self.images - before.images,
            self.decoded - before.decoded,
        )


def bodies(count: int, seed: int = 0) -> list[bytes]:
    return [png_bytes(digit_picture(d)) for d in held_out_digits(count, seed)]


async def test_an_image_sent_again_is_answered_without_decode_or_inference(
    tmp_path: Path,
) -> None:
    (body,) = bodies(1)
    async with cache_app(tmp_path) as client:
        before = await Counts.read(client)
        first = await client.post("/predict?top_k=10", content=body, headers=PNG)
        assert first.status_code == 200, first.text
        middle = await Counts.read(client)
        assert middle.since(before) == (0, 1, 1, 1)  # a miss: decoded and run
        again = await client.post("/predict?top_k=10", content=body, headers=PNG)
        fewer = await client.post("/predict?top_k=2", content=body, headers=PNG)
        after = await Counts.read(client)
        assert after.since(middle) == (2, 0, 0, 0)  # two hits: no decode, no forward pass
        assert again.json() == first.json()
        assert (
            fewer.json()["results"][0]["predictions"]
            == first.json()["results"][0]["predictions"][:2]
        )  # top_k shapes the response, not the key
        assert after.entries == 1


async def test_several_images_hit_only_together_and_v2_shares_the_answers(
    tmp_path: Path,
) -> None:
    one, two = bodies(2)
    files = [("files", ("a.png", one, "image/png")), ("files", ("b.png", two, "image/png"))]
    async with cache_app(tmp_path) as client:
        await client.post("/predict", content=one, headers=PNG)
        before = await Counts.read(client)
        both = await client.post("/predict", files=files)
        assert both.status_code == 200, both.text
        middle = await Counts.read(client)
        assert middle.since(before)[:3] == (0, 2, 2)  # one was cached, but not the request
        again = await client.post("/predict", files=files)
        assert again.json() == both.json()
        v2 = await client.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                              "data": [base64.b64encode(two).decode()]}]},
        )  # fmt: skip
        assert v2.status_code == 200, v2.text
        after = await Counts.read(client)
        assert after.since(middle)[:3] == (3, 0, 0)
        probabilities = v2.json()["outputs"][0]["data"]
        top = max(range(len(probabilities)), key=probabilities.__getitem__)
        assert both.json()["results"][1]["predictions"][0]["class_index"] == top


async def test_heatmaps_are_cached_per_method_layer_and_target(tmp_path: Path) -> None:
    (body,) = bodies(1, seed=3)
    async with cache_app(tmp_path) as client:
        card = (await client.get("/models/digits")).json()
        layers = [layer["name"] for layer in card["heatmap_layers"]]
        gradcam = await client.post("/predict?heatmap=gradcam", content=body, headers=PNG)
        assert gradcam.status_code == 200, gradcam.text
        before = await Counts.read(client)
        picture = await client.post(
            "/predict", content=body, headers={**PNG, "accept": "image/png"}
        )  # the same Grad-CAM, as a picture
        assert picture.content == base64.b64decode(gradcam.json()["results"][0]["heatmap"]["png"])
        hit = await Counts.read(client)
        assert hit.since(before) == (1, 0, 0, 0)
        for query in (
            "heatmap=activation",
            f"heatmap=gradcam&layer={layers[0]}",
            "heatmap=gradcam&target=7",
            "",  # no heatmap is another answer too
        ):
            answer = await client.post(f"/predict?{query}", content=body, headers=PNG)
            assert answer.status_code == 200, (query, answer.text)
        after = await Counts.read(client)
        assert after.since(hit)[:3] == (0, 4, 4)
        assert after.entries == 5


async def test_never_shared_across_models_and_off_at_zero(tmp_path: Path) -> None:
    (body,) = bodies(1)
    async with cache_app(tmp_path) as client:
        await client.post("/predict?model=digits", content=body, headers=PNG)
        before = await Counts.read(client)
        other = await client.post("/predict?model=lenet5", content=body, headers=PNG)
        assert other.json()["model"]["name"] == "lenet5"
        assert (await Counts.read(client)).since(before)[:3] == (0, 1, 1)
    async with cache_app(tmp_path / "off", CONVSERVE_CACHE_ENTRIES="0") as client:
        before = await Counts.read(client)  # the metrics are this test process's, all apps'
        for _ in range(2):
            await client.post("/predict", content=body, headers=PNG)
        assert (await Counts.read(client)).since(before) == (0, 0, 2, 2)


async def test_entries_and_memory_stay_within_their_bounds(tmp_path: Path) -> None:
    images = bodies(4, seed=1)
    async with cache_app(tmp_path, CONVSERVE_CACHE_ENTRIES="2") as client:
        for body in images:
            await client.post("/predict", content=body, headers=PNG)
        counts = await Counts.read(client)
        assert counts.entries == 2
        before = counts
        await client.post("/predict", content=images[0], headers=PNG)  # evicted: a miss
        await client.post("/predict", content=images[0], headers=PNG)  # kept now: a hit
        await client.post("/predict", content=images[2], headers=PNG)  # evicted by images[0]
        assert (await Counts.read(client)).since(before)[:2] == (1, 2)
    # 1 MB holds some heatmap answers (each with its overlay picture), not all twelve
    pictures = [png_bytes(digit_picture(d, size=512)) for d in held_out_digits(12, seed=2)]
    async with cache_app(tmp_path / "small", CONVSERVE_CACHE_MB="1") as client:
        for body in pictures:
            answer = await client.post("/predict?heatmap=gradcam", content=body, headers=PNG)
            assert answer.status_code == 200, answer.text
        text = (await client.get("/metrics")).text
        assert 0 < metric_value(text, "convserve_cache_bytes") <= 1024 * 1024
        assert 1 <= metric_value(text, "convserve_cache_entries") < 12


async def test_unload_and_reload_empty_the_entries_of_that_version(tmp_path: Path) -> None:
    (body,) = bodies(1, seed=5)
    async with cache_app(tmp_path) as client:
        add_version(tmp_path / "store", "lenet5", 2)  # digits v2: another network
        loaded = await client.post("/models/digits/versions/2/load", headers=KEY)
        assert loaded.status_code == 200, loaded.text
        for version in (1, 2):
            await client.post(f"/predict?version={version}", content=body, headers=PNG)
        assert (await Counts.read(client)).entries == 2
        reloaded = await client.post("/models/digits/versions/2/reload", headers=KEY)
        assert reloaded.status_code == 200, reloaded.text
        await client.post("/predict?version=1", content=body, headers=PNG)  # looks: prunes
        assert (await Counts.read(client)).entries == 1
        before = await Counts.read(client)
        await client.post("/predict?version=2", content=body, headers=PNG)
        assert (await Counts.read(client)).since(before)[:3] == (0, 1, 1)  # a new load misses
        unloaded = await client.post("/models/digits/versions/1/unload", headers=KEY)
        assert unloaded.status_code == 200, unloaded.text
        await client.post("/predict", content=body, headers=PNG)
        assert (await Counts.read(client)).entries == 1  # only v2's answer is left


def test_two_workers_cache_alike_and_drop_an_unloaded_version(tmp_path: Path) -> None:
    store = tmp_path / "store"
    add_version(store, "digits", 1)
    add_version(store, "lenet5", 2)
    env = {"CONVSERVE_WORKERS": "2", "CONVSERVE_STORE": str(store), "CONVSERVE_API_KEY": "k"}
    (body,) = bodies(1, seed=6)
    with running_server(tmp_path, env) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post("/predict?version=1", content=body, headers=PNG) for _ in range(8)]
        assert all(a.status_code == 200 for a in answers)
        assert all(a.json() == answers[0].json() for a in answers)
        text = client.get("/metrics").text
        hits = metric_value(text, "convserve_cache_lookups_total", result="hit")
        misses = metric_value(text, "convserve_cache_lookups_total", result="miss")
        assert (hits + misses, metric_value(text, "convserve_images_total")) == (8, misses)
        assert misses <= 2
        assert metric_value(text, "convserve_cache_entries") == misses
        key = {"authorization": "Bearer k"}
        assert client.post("/models/digits/versions/1/unload", headers=key).status_code == 200
        before = misses
        deadline = time.monotonic() + 10
        while True:  # each worker hears of it at its next status poll (every 0.5 s)
            client.post("/predict", content=body, headers=PNG)  # v2 now: its own entries
            text = client.get("/metrics").text
            misses = metric_value(text, "convserve_cache_lookups_total", result="miss")
            if metric_value(text, "convserve_cache_entries") == misses - before:
                break  # v1's entries are gone: the ones left are v2's misses
            assert time.monotonic() < deadline, "v1's answers were kept after its unload"
            time.sleep(0.2)
