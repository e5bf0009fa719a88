"""POST /predict over real HTTP: formats, models, batching and every error as problem+json."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.config import Settings
from service.registry import ARCHITECTURES, Architecture, SmallCNN, register_architecture
from tests.conftest import ready_client
from tests.support import (
    BUNDLED_STORE,
    digit_picture,
    encodings,
    held_out_digits,
    metric_value,
    png_bytes,
    resent,
)

pytestmark = pytest.mark.anyio
Client = httpx.AsyncClient
PNG = {"content-type": "image/png"}


def assert_problem(response: object, status: int, *fragments: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    body: dict[str, object] = response.json()  # type: ignore[attr-defined]
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert "Traceback" not in str(body["detail"])
    for fragment in fragments:
        assert fragment in str(body["detail"]), body["detail"]
    return body


async def still_serves(client: Client) -> None:
    digit = held_out_digits(1)[0]
    response = await client.post("/predict", content=png_bytes(digit.image), headers=PNG)
    assert response.status_code == 200
    assert response.json()["results"][0]["predictions"][0]["class_index"] == digit.label


async def test_raw_body_gives_the_documented_shape(client: Client) -> None:
    digit = held_out_digits(1)[0]
    response = await client.post("/predict", content=png_bytes(digit.image), headers=PNG)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model"] == {"name": "digits", "version": 1}
    (result,) = body["results"]
    assert list(result) == ["predictions"]
    predictions = result["predictions"]
    assert len(predictions) == 5
    assert predictions[0] == {
        "label": str(digit.label),
        "class_index": digit.label,
        "probability": predictions[0]["probability"],
    }
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)


async def test_softmax_once_sums_to_one_and_top_k_is_clipped(client: Client) -> None:
    digit = held_out_digits(2)[1]
    response = await client.post("/predict?top_k=50", content=png_bytes(digit.image), headers=PNG)
    predictions = response.json()["results"][0]["predictions"]
    assert len(predictions) == 10
    assert sorted(p["class_index"] for p in predictions) == list(range(10))
    assert abs(sum(p["probability"] for p in predictions) - 1.0) < 1e-5
    assert predictions[0]["probability"] > 0.9  # one softmax: a second one would flatten this
    one = await client.post("/predict?top_k=1", content=png_bytes(digit.image), headers=PNG)
    assert len(one.json()["results"][0]["predictions"]) == 1


@pytest.mark.parametrize("name", ["digits", "lenet5"])
async def test_held_out_digits_are_classified_by_both_models(client: Client, name: str) -> None:
    digits = held_out_digits(20)
    files = [("file", (f"{i}.png", png_bytes(d.image), "image/png")) for i, d in enumerate(digits)]
    response = await client.post(f"/models/{name}/predict?top_k=1", files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["model"]["name"] == name
    predicted = [r["predictions"][0]["class_index"] for r in body["results"]]
    correct = sum(p == d.label for p, d in zip(predicted, digits, strict=True))
    assert correct >= 19  # in request order: a shuffled answer would score about 2
    query = await client.post(f"/predict?model={name}&version=1", files=files[:1])
    assert query.json()["model"] == {"name": name, "version": 1}


async def test_every_format_gives_the_same_top_class(client: Client) -> None:
    for digit in held_out_digits(3):
        picture = digit_picture(digit)
        for fmt, (content_type, data) in encodings(picture).items():
            response = await client.post(
                "/predict", content=data, headers={"content-type": content_type}
            )
            assert response.status_code == 200, (fmt, response.text)
            top = response.json()["results"][0]["predictions"][0]
            assert top["class_index"] == digit.label, (fmt, top)


async def test_multipart_results_follow_request_order(client: Client) -> None:
    digits = held_out_digits(6)
    files = [("file", (f"{i}.png", png_bytes(d.image), "image/png")) for i, d in enumerate(digits)]
    response = await client.post("/predict?top_k=1", files=files)
    labels = [r["predictions"][0]["class_index"] for r in response.json()["results"]]
    assert labels == [d.label for d in digits]


async def test_concurrent_requests_get_their_own_answers_in_batches(client: Client) -> None:
    digits = held_out_digits(64)
    bodies = [png_bytes(d.image) for d in digits]
    alone = []
    for body in bodies:
        response = await client.post("/predict?top_k=10", content=body, headers=PNG)
        alone.append(response.json()["results"][0]["predictions"])
    again = [resent(d.image) for d in digits]  # computed again, not the cache's answers
    before = (await client.get("/metrics")).text
    responses = await asyncio.gather(
        *(client.post("/predict?top_k=10", content=body, headers=PNG) for body in again)
    )
    after = (await client.get("/metrics")).text
    for response, expected in zip(responses, alone, strict=True):
        got = response.json()["results"][0]["predictions"]
        assert [p["class_index"] for p in got][:1] == [p["class_index"] for p in expected][:1]
        got_p = {p["class_index"]: p["probability"] for p in got}
        for p in expected:
            assert abs(got_p[p["class_index"]] - p["probability"]) < 1e-4
    labels = {"model": "digits", "version": "1"}
    batches = metric_value(after, "convserve_batch_size_count", **labels) - metric_value(
        before, "convserve_batch_size_count", **labels
    )
    images = metric_value(after, "convserve_batch_size_sum", **labels) - metric_value(
        before, "convserve_batch_size_sum", **labels
    )
    singles = metric_value(after, "convserve_batch_size_bucket", le="1.0", **labels) - metric_value(
        before, "convserve_batch_size_bucket", le="1.0", **labels
    )
    assert images == 64
    assert batches < 64, "no batch larger than one image was formed"
    assert singles < batches


async def test_unknown_model_and_version(client: Client) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    assert_problem(
        await client.post("/predict?model=nope", content=body, headers=PNG),
        404,
        "no model named 'nope'",
        "digits, lenet5",
    )
    assert_problem(await client.post("/models/nope/predict", content=body, headers=PNG), 404)
    assert_problem(
        await client.post("/predict?version=7", content=body, headers=PNG), 404, "has no version 7"
    )
    assert_problem(
        await client.post("/predict?version=stable", content=body, headers=PNG),
        404,
        "no version or alias 'stable'",
    )
    assert_problem(
        await client.post("/models/..%2F..%2Fetc/predict", content=body, headers=PNG), 404
    )
    await still_serves(client)


@pytest.mark.parametrize(
    "query",
    [
        "top_k=0",
        "top_k=abc",
        "heatmap=sobel",
        "target=-1",
        "target=10&heatmap=gradcam",
        "layer=conv1",
    ],
)
async def test_bad_query_values_are_422(client: Client, query: str) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    assert_problem(await client.post(f"/predict?{query}", content=body, headers=PNG), 422)


async def test_undecodable_bodies_are_400(client: Client) -> None:
    cases = {
        b"": "no image data",
        b"GIF89a\x00garbage": "cannot",
        png_bytes(Image.new("RGB", (64, 64)))[:60]: "corrupt or truncated",
        b"%PDF-1.4 not an image": "cannot identify an image",
    }
    for data, fragment in cases.items():
        response = await client.post("/predict", content=data, headers=PNG)
        assert_problem(response, 400, fragment)
    await still_serves(client)


async def test_decompression_bomb_is_400(client: Client) -> None:
    bomb = png_bytes(Image.new("L", (20_000, 20_000)))  # 400 megapixels in a few hundred KB
    assert len(bomb) < 1_000_000
    assert_problem(
        await client.post("/predict", content=bomb, headers=PNG), 400, "decompression bomb"
    )
    await still_serves(client)


async def test_unsupported_content_types_are_415(client: Client) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    for content_type in ("text/plain", "application/json", "image/svg+xml", ""):
        headers = {"content-type": content_type} if content_type else {}
        assert_problem(await client.post("/predict", content=body, headers=headers), 415)


async def test_multipart_without_files_and_empty_parts_are_400(client: Client) -> None:
    assert_problem(await client.post("/predict", data={"note": "hi"}, files={"x": ("", b"")}), 400)
    response = await client.post("/predict", files=[("file", ("a.png", b"", "image/png"))])
    assert_problem(response, 400, "file 1 (a.png)", "no image data")


async def test_a_part_with_a_filename_is_an_image_whatever_its_name(client: Client) -> None:
    """Forms that name the field otherwise (`image`, `upload`) work; fields without a file are
    ignored (docs/reliability.md)."""
    bodies = [png_bytes(d.image) for d in held_out_digits(2)]
    files: list[tuple[str, tuple[str | None, bytes, str | None]]] = [
        ("note", (None, b"ignored", None)),
        ("image", ("a.png", bodies[0], "image/png")),
        ("file", ("b.png", bodies[1], "image/png")),
    ]
    response = await client.post("/predict", files=files)
    assert response.status_code == 200
    assert len(response.json()["results"]) == 2


async def copied_store(tmp_path: Path, name: str) -> Path:
    store = tmp_path / "store"
    shutil.copytree(BUNDLED_STORE / "digits", store / name)
    return store


@asynccontextmanager
async def app_with(tmp_path: Path, name: str, **env: str) -> AsyncIterator[Client]:
    store = await copied_store(tmp_path, name)
    settings = Settings.from_env({"CONVSERVE_STORE": str(store), **env})
    async with ready_client(settings) as client:
        yield client


async def test_too_many_pixels_is_400(tmp_path: Path) -> None:
    async with app_with(tmp_path, "pixels", CONVSERVE_MAX_PIXELS="1000") as client:
        big = png_bytes(digit_picture(held_out_digits(1)[0], size=40))
        assert_problem(
            await client.post("/predict", content=big, headers=PNG),
            400,
            "the PNG image is 1,600 pixels; the limit is 1,000",
        )
        small = png_bytes(held_out_digits(1)[0].image)
        assert (await client.post("/predict", content=small, headers=PNG)).status_code == 200


async def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with app_with(
        tmp_path, "bytes", CONVSERVE_MAX_BODY_BYTES="2000", CONVSERVE_MAX_IMAGES="3"
    ) as client:
        big = png_bytes(digit_picture(held_out_digits(1)[0], size=200), "BMP")
        assert_problem(await client.post("/predict", content=big, headers=PNG), 413, "2,000 bytes")
        files = [("file", (f"{i}.png", b"x", "image/png")) for i in range(5)]
        assert_problem(await client.post("/predict", files=files), 413, "the limit is 3 images")
        small = png_bytes(held_out_digits(1)[0].image)
        assert (await client.post("/predict", content=small, headers=PNG)).status_code == 200


async def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    async with app_with(tmp_path, "tinyqueue", CONVSERVE_MAX_QUEUE="2") as client:
        files = [
            ("file", (f"{i}.png", png_bytes(d.image), "image/png"))
            for i, d in enumerate(held_out_digits(3))
        ]
        response = await client.post("/predict", files=files)
        assert_problem(response, 503, "holds 0 of 2 images")
        assert int(response.headers["retry-after"]) >= 1
        assert (await client.post("/predict", files=files[:2])).status_code == 200


async def test_deadline_passed_is_504_and_not_run(tmp_path: Path) -> None:
    async with app_with(tmp_path, "hurry", CONVSERVE_DEADLINE_MS="0") as client:
        before = (await client.get("/metrics")).text
        body = png_bytes(held_out_digits(1)[0].image)
        assert_problem(await client.post("/predict", content=body, headers=PNG), 504, "deadline")
        after = (await client.get("/metrics")).text
        ran = metric_value(after, "convserve_images_total", model="hurry") - metric_value(
            before, "convserve_images_total", model="hurry"
        )
        assert ran == 0


async def test_probabilities_are_numbers_in_range(client: Client) -> None:
    data = np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    response = await client.post(
        "/predict?top_k=10", content=png_bytes(Image.fromarray(data)), headers=PNG
    )
    values = [p["probability"] for p in response.json()["results"][0]["predictions"]]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert abs(sum(values) - 1.0) < 1e-5


class FragileCNN(SmallCNN):
    """Fails on bright images, so one bad image can be put in a batch of good ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).mean(dim=1) > 2.0).any()):
            raise RuntimeError("this network cannot take such a bright image")
        return super().forward(x)


async def test_a_failing_image_fails_alone(tmp_path: Path) -> None:
    if "test_fragile_cnn" not in ARCHITECTURES:
        register_architecture(Architecture("test_fragile_cnn", FragileCNN, "conv2", "fragile"))
    store = await copied_store(tmp_path, "fragile")
    spec = store / "fragile" / "1" / "model.json"
    spec.write_text(spec.read_text().replace('"small_cnn"', '"test_fragile_cnn"'))
    bright = Image.new("L", (28, 28), 0)
    bright.paste(255, (1, 1, 27, 27))
    digits = held_out_digits(31)
    settings = Settings.from_env({"CONVSERVE_STORE": str(store), "CONVSERVE_ENGINE": "torch"})
    async with ready_client(settings) as client:
        bodies = [png_bytes(d.image) for d in digits[:15]] + [png_bytes(bright)]
        bodies += [png_bytes(d.image) for d in digits[15:]]
        responses = await asyncio.gather(
            *(client.post("/predict", content=body, headers=PNG) for body in bodies)
        )
        assert_problem(responses[15], 500, "cannot take such a bright image")
        good = responses[:15] + responses[16:]
        for response, digit in zip(good, digits, strict=True):
            alone = await client.post("/predict", content=png_bytes(digit.image), headers=PNG)
            assert response.status_code == 200
            got = response.json()["results"][0]["predictions"]
            expected = alone.json()["results"][0]["predictions"]
            assert [p["class_index"] for p in got] == [p["class_index"] for p in expected]
            for a, b in zip(got, expected, strict=True):
                assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
