"""Kept images: an image uploaded once with `keep=true` is named by its id (`image=`) in later
requests (other heatmaps, the layer explorer) instead of being sent again, from any worker."""

from __future__ import annotations

import hashlib
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
    png_bytes,
    running_server,
)

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}


def picture(seed: int = 0) -> bytes:
    return png_bytes(digit_picture(held_out_digits(1, seed)[0]))


async def test_a_kept_image_is_named_instead_of_sent(client: httpx.AsyncClient) -> None:
    body = picture(seed=11)
    kept = await client.post("/predict?keep=true&heatmap=gradcam", content=body, headers=PNG)
    assert kept.status_code == 200, kept.text
    image = kept.headers["image-id"]
    assert image == hashlib.sha256(body).hexdigest()
    for query in ("heatmap=activation&layer=conv1", "top_k=3", "heatmap=gradcam"):
        named = await client.post(f"/predict?image={image}&{query}")
        sent = await client.post(f"/predict?{query}", content=body, headers=PNG)
        assert named.status_code == 200, named.text
        assert named.json() == sent.json()
    maps = "/models/digits/layers/conv1/maps"
    named = await client.post(f"{maps}?image={image}")
    sent = await client.post(maps, content=body, headers=PNG)
    assert named.status_code == 200, named.text
    assert named.content == sent.content
    png = await client.post(f"/predict?image={image}", headers={"accept": "image/png"})
    assert png.headers["content-type"] == "image/png"


async def test_naming_an_image_not_held_says_to_send_it(client: httpx.AsyncClient) -> None:
    unknown = hashlib.sha256(b"never sent").hexdigest()
    for path in ("/predict", "/models/digits/layers/conv1/maps"):
        missing = await client.post(f"{path}?image={unknown}")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        problem = missing.json()
        assert problem["type"].endswith("image-not-held")
        assert "send the image again" in problem["detail"]
    bad = await client.post("/predict?image=not-a-digest")
    assert bad.status_code in (400, 422)
    assert "image" in bad.json()["detail"]
    body = picture(seed=12)
    kept = await client.post("/predict?keep=true", content=body, headers=PNG)
    both = await client.post(f"/predict?image={kept.headers['image-id']}", content=body,
                             headers=PNG)  # fmt: skip
    assert both.status_code == 400
    assert "either" in both.json()["detail"]
    files = [("file", (f"{i}.png", body, "image/png")) for i in range(2)]
    several = await client.post("/predict?keep=true", files=files)
    assert several.status_code == 400
    assert "one image" in several.json()["detail"]


def test_every_worker_finds_a_kept_image(tmp_path: Path) -> None:
    """The model process holds kept images, so a request naming one may reach any worker."""
    body = picture(seed=13)
    env = {"CONVSERVE_WORKERS": "2", "CONVSERVE_STORE": str(BUNDLED_STORE)}
    with running_server(tmp_path, env) as server:
        kept = httpx.post(f"{server.url}/predict?keep=true", content=body, headers=PNG)
        assert kept.status_code == 200, kept.text
        image = kept.headers["image-id"]
        # the first heatmap builds the torch network in the model process: seconds on a
        # loaded machine, more than httpx's default 5 s timeout
        sent = httpx.post(
            f"{server.url}/predict?heatmap=activation", content=body, headers=PNG, timeout=60
        )
        for _ in range(12):  # a fresh connection each time: the kernel spreads them
            named = httpx.post(f"{server.url}/predict?image={image}&heatmap=activation", timeout=60)
            assert named.status_code == 200, named.text
            assert named.json() == sent.json()
        log = server.output()
        assert "Traceback" not in log


async def test_with_the_cache_off_nothing_is_kept(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_CACHE_ENTRIES": "0"}
    )
    async with app_client(create_app(settings)) as client:
        answer = await client.post("/predict?keep=true", content=picture(seed=14), headers=PNG)
        assert answer.status_code == 200, answer.text
        assert "image-id" not in answer.headers  # the page then sends the image each time
