"""Heatmaps through real HTTP: Grad-CAM and activation maps, correct, batched, hook-free after."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.app import create_app
from service.classifier import Classifier
from service.config import Settings
from service.imaging import DecodeLimits, prepare_image
from service.importing import import_torchvision
from service.store import ModelStore
from tests.conftest import app_client
from tests.support import BUNDLED_STORE, held_out_digits, metric_value, png_bytes, resent

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}
CPU = torch.device("cpu")


def heatmap_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    heatmap: dict[str, Any] = result["heatmap"]
    return heatmap


def reference_grad_cam(
    classifier: Classifier, array: np.ndarray, module_name: str, target: int
) -> np.ndarray:
    """Grad-CAM written out plainly: hook the layer, full autograd from the input, weight the
    maps by their mean gradients, ReLU, scale to 0..1."""
    model = classifier.module
    saved: list[torch.Tensor] = []
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda module, inputs, output: saved.append(output)
    )
    try:
        x = torch.from_numpy(array[None]).clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            (gradients,) = torch.autograd.grad(logits[0, target], saved[0])
    finally:
        handle.remove()
    activations = saved[0].detach()[0]
    weights = gradients[0].mean(dim=(1, 2))
    cam = torch.relu((weights[:, None, None] * activations).sum(dim=0))
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return cam.numpy()


def hooks_left(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


async def test_gradcam_response_fields(client: httpx.AsyncClient) -> None:
    digit = held_out_digits(1)[0]
    response = await client.post(
        "/predict?heatmap=gradcam", content=png_bytes(digit.image), headers=PNG
    )
    body = response.json()["results"][0]
    heatmap = heatmap_of(response)
    top = body["predictions"][0]["class_index"]
    assert heatmap["method"] == "gradcam"
    assert heatmap["layer"] == "conv2"  # the model's heatmap_layer
    assert heatmap["class_index"] == top
    assert (heatmap["width"], heatmap["height"]) == (14, 14)
    grid = np.array(heatmap["grid"])
    assert grid.shape == (14, 14)
    assert grid.min() >= 0.0
    assert grid.max() == pytest.approx(1.0)
    picture = Image.open(io.BytesIO(base64.b64decode(str(heatmap["png"]))))
    assert picture.format == "PNG"
    assert picture.size == (280, 280)  # the 28x28 upload, enlarged to be seen


async def test_target_and_layer_choose_what_is_explained(client: httpx.AsyncClient) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    heatmap = heatmap_of(
        await client.post(
            "/predict?heatmap=gradcam&target=3&layer=conv1", content=body, headers=PNG
        )
    )
    assert (heatmap["class_index"], heatmap["layer"]) == (3, "conv1")
    assert (heatmap["width"], heatmap["height"]) == (28, 28)


async def test_activation_maps_walk_every_conv_layer(client: httpx.AsyncClient) -> None:
    card = (await client.get("/models/digits")).json()
    layers = [layer["name"] for layer in card["heatmap_layers"]]
    assert layers == ["conv1", "conv2"]
    assert [layer["reads"] for layer in card["heatmap_layers"]] == ["relu1", "relu2"]
    body = png_bytes(held_out_digits(1)[0].image)
    sizes = []
    for layer in layers:
        heatmap = heatmap_of(
            await client.post(
                f"/predict?heatmap=activation&layer={layer}", content=body, headers=PNG
            )
        )
        assert heatmap["method"] == "activation"
        sizes.append(heatmap["width"])
        grid = np.array(heatmap["grid"])
        assert grid.min() >= 0.0
        assert grid.max() == pytest.approx(1.0)
    assert sizes == [28, 14]


async def test_conv1_activation_lights_up_on_the_strokes(client: httpx.AsyncClient) -> None:
    digit = held_out_digits(1)[0]
    heatmap = heatmap_of(
        await client.post(
            "/predict?heatmap=activation&layer=conv1", content=png_bytes(digit.image), headers=PNG
        )
    )
    grid = np.array(heatmap["grid"])
    strokes = np.asarray(digit.image) > 128
    near = grid[strokes].mean()
    far = grid[~strokes].mean()
    assert near > 2 * far


async def test_accept_png_returns_the_picture(client: httpx.AsyncClient) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    response = await client.post(
        "/predict?heatmap=gradcam", content=body, headers={**PNG, "accept": "image/png"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (280, 280)
    plain = await client.post("/predict", content=body, headers={**PNG, "accept": "image/png"})
    assert plain.headers["content-type"] == "image/png"  # Grad-CAM when no method is named
    files = [("file", (f"{i}.png", body, "image/png")) for i in range(2)]
    several = await client.post(
        "/predict?heatmap=gradcam", files=files, headers={"accept": "image/png"}
    )
    assert several.status_code == 406


async def test_unknown_layer_lists_the_valid_ones(client: httpx.AsyncClient) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    response = await client.post("/predict?heatmap=gradcam&layer=fc1", content=body, headers=PNG)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "valid layers: conv1, conv2" in response.json()["detail"]


async def test_gradcam_matches_a_plain_reference_within_1e5(client: httpx.AsyncClient) -> None:
    classifier = ModelStore(BUNDLED_STORE).load("digits", 1, CPU)
    for digit in held_out_digits(5):
        data = png_bytes(digit.image)
        array = prepare_image(data, classifier.spec.input, DecodeLimits(10**6)).array
        for layer, module in (("conv2", "relu2"), ("conv1", "relu1")):
            heatmap = heatmap_of(
                await client.post(
                    f"/predict?heatmap=gradcam&layer={layer}&target=7", content=data, headers=PNG
                )
            )
            expected = reference_grad_cam(classifier, array, module, 7)
            np.testing.assert_allclose(np.array(heatmap["grid"]), expected, atol=1e-5)


def test_gradcam_matches_the_reference_on_resnet18(tmp_path: Path) -> None:
    """Residual blocks and in-place ReLUs: the path torchvision models take."""
    store = ModelStore(tmp_path)
    import_torchvision(store, "resnet18", "resnet18", weights=None)
    classifier = store.load("resnet18", 1, CPU)
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(3, 224, 224)).astype(np.float32) for _ in range(3)]
    explained = classifier.explain(arrays, "gradcam", "layer4", [None, 5, None])
    assert explained.targets[1] == 5
    for array, grid, target in zip(arrays, explained.grids, explained.targets, strict=True):
        expected = reference_grad_cam(classifier, array, "layer4", target)
        np.testing.assert_allclose(grid, expected, atol=1e-5)
    assert hooks_left(classifier.module) == 0


async def test_gradcam_mass_sits_where_the_digit_is(client: httpx.AsyncClient) -> None:
    """A digit pasted in one quadrant of a blank 56x56 canvas: the map's mass follows it."""
    fractions = []
    for digit in held_out_digits(10):
        for x, y in ((0, 0), (28, 0), (0, 28), (28, 28)):
            canvas = Image.new("L", (56, 56), 0)
            canvas.paste(digit.image, (x, y))
            heatmap = heatmap_of(
                await client.post(
                    "/predict?heatmap=gradcam", content=png_bytes(canvas), headers=PNG
                )
            )
            grid = np.array(heatmap["grid"])
            half = grid.shape[0] // 2
            rows = slice(0, half) if y == 0 else slice(half, None)
            cols = slice(0, half) if x == 0 else slice(half, None)
            fractions.append(grid[rows, cols].sum() / grid.sum())
    assert min(fractions) > 0.4  # a quarter would be no better than chance
    assert float(np.mean(fractions)) > 0.75


async def test_heatmaps_are_batched_and_hooks_are_removed() -> None:
    app = create_app(Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE)}))
    async with app_client(app) as client:
        digits = held_out_digits(24)
        bodies = [png_bytes(d.image) for d in digits]
        alone = []
        for body in bodies:
            response = await client.post("/predict?heatmap=gradcam", content=body, headers=PNG)
            alone.append(heatmap_of(response)["grid"])
        again = [resent(d.image) for d in digits]  # computed again, not the cache's answers
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(
            *(client.post("/predict?heatmap=gradcam", content=body, headers=PNG) for body in again),
            *(
                client.post("/predict?heatmap=activation&layer=conv1", content=body, headers=PNG)
                for body in bodies[:8]
            ),
            *(client.post("/predict", content=body, headers=PNG) for body in bodies[:8]),
            client.post("/predict?heatmap=gradcam&layer=nope", content=bodies[0], headers=PNG),
        )
        after = (await client.get("/metrics")).text
        for response, expected in zip(responses[:24], alone, strict=True):
            np.testing.assert_allclose(np.array(heatmap_of(response)["grid"]), expected, atol=1e-5)
        labels = {"model": "digits", "version": "1", "kind": "gradcam"}
        passes = metric_value(after, "convserve_inference_seconds_count", **labels) - metric_value(
            before, "convserve_inference_seconds_count", **labels
        )
        assert 1 <= passes < 24, "Grad-CAM requests were not batched"
        runtime = app.state.runtime
        classifier = runtime.catalog.resolve("digits", None).classifier
        assert hooks_left(classifier.module) == 0
