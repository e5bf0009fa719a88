"""The convolution explainer's route: a conv layer's kernels and maps, checked against the
network's own forward pass, and one output value redone by hand from what the route returns."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from service.anatomy import describe, trace
from service.app import create_app
from service.classifier import Classifier
from service.config import Settings
from service.convolution import open_convolution
from service.heatmaps import heatmap_layers
from service.imaging import DecodeLimits, prepare_image
from service.importing import import_torchvision
from service.network import Network
from service.spec import InputSpec, ModelSpec, now_iso
from service.store import ModelStore
from tests.conftest import app_client
from tests.support import BUNDLED_STORE, held_out_digits, png_bytes

pytestmark = pytest.mark.anyio
PNG = {"content-type": "image/png"}
CPU = torch.device("cpu")
PROBLEM = "application/problem+json"
# torch's padding modes as numpy.pad names them
PAD_MODES: dict[str, Literal["constant", "reflect", "edge", "wrap"]] = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "edge",
    "circular": "wrap",
}


def array_of(tensor: dict[str, Any]) -> np.ndarray:
    assert tensor["dtype"] == "float32"
    data = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4")
    return data.reshape(tensor["shape"])


def one_value(maps: dict[str, Any], channel: int, row: int, col: int) -> tuple[float, float]:
    """What the page's step-through does: the patch under the kernel, the products, their sum
    and the bias, from the route's own numbers; returns (sum of products, sum + bias)."""
    received, weight = array_of(maps["input"]), array_of(maps["weight"])
    bias = 0.0 if maps["bias"] is None else float(array_of(maps["bias"])[channel])
    per_group = maps["in_channels"] // maps["groups"]
    first = channel // (maps["out_channels"] // maps["groups"]) * per_group
    (kh, kw), (sh, sw) = maps["kernel"], maps["stride"]
    (ph, pw), (dh, dw) = maps["padding"], maps["dilation"]
    widths = ((0, 0), (ph, ph + dh * kh), (pw, pw + dw * kw))
    padded = np.pad(received.astype(np.float64), widths, mode=PAD_MODES[maps["padding_mode"]])
    top, left = row * sh, col * sw  # in padded coordinates
    patch = padded[first : first + per_group, top : top + dh * kh : dh, left : left + dw * kw : dw]
    products = patch * weight[channel].astype(np.float64)
    total = float(products.sum())
    return total, total + bias


def check_step_through(maps: dict[str, Any]) -> None:
    pre = array_of(maps["pre"])
    channels, height, width = pre.shape
    positions = [(0, 0), (height - 1, width - 1), (height // 2, width // 3), (1, width - 2)]
    for channel in {0, channels // 2, channels - 1}:
        for row, col in positions:
            _, value = one_value(maps, channel, row, col)
            assert value == pytest.approx(float(pre[channel, row, col]), abs=1e-4)


async def post_maps(
    client: httpx.AsyncClient, model: str, layer: str, body: bytes
) -> dict[str, Any]:
    response = await client.post(f"/models/{model}/layers/{layer}/maps", content=body, headers=PNG)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    maps: dict[str, Any] = response.json()
    return maps


class Taps:
    """Forward hooks of the test's own: what a module received and returned (removed by close)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [
            model.get_submodule(name).register_forward_hook(self.keep(name)) for name in names
        ]

    def keep(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            self.seen[name] = (inputs[0].detach().clone(), output.detach().clone())

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize(
    ("model", "layer", "activation"),
    [
        ("digits", "conv1", "relu1"),
        ("digits", "conv2", "relu2"),
        ("lenet5", "conv1", "relu1"),
        ("lenet5", "conv2", "relu2"),
    ],
)
async def test_maps_equal_the_forward_pass(
    client: httpx.AsyncClient, model: str, layer: str, activation: str
) -> None:
    classifier = ModelStore(BUNDLED_STORE).load(model, 1, CPU)
    conv = classifier.module.get_submodule(layer)
    assert isinstance(conv, nn.Conv2d)
    for digit in held_out_digits(3):
        body = png_bytes(digit.image)
        maps = await post_maps(client, model, layer, body)
        assert maps["model"] == {"name": model, "version": 1}
        assert maps["after"] == [{"name": activation, "type": "ReLU"}]
        array = prepare_image(body, classifier.spec.input, DecodeLimits(10**6)).array
        taps = Taps(classifier.module, [layer, activation])
        try:
            with torch.inference_mode():
                classifier.module(torch.from_numpy(array[None]))
        finally:
            taps.close()
        received, output = taps.seen[layer]
        np.testing.assert_allclose(array_of(maps["input"]), received[0].numpy(), atol=1e-6)
        if layer == "conv1":
            np.testing.assert_allclose(array_of(maps["input"]), array, atol=1e-6)
        np.testing.assert_allclose(array_of(maps["pre"]), output[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(
            array_of(maps["post"]), taps.seen[activation][1][0].numpy(), atol=1e-5
        )
        np.testing.assert_allclose(
            array_of(maps["post"]), np.maximum(array_of(maps["pre"]), 0), atol=1e-6
        )
        np.testing.assert_array_equal(array_of(maps["weight"]), conv.weight.numpy())
        assert conv.bias is not None
        np.testing.assert_array_equal(array_of(maps["bias"]), conv.bias.numpy())
        assert maps["kernel"] == list(conv.kernel_size)
        assert maps["padding"] == list(conv.padding)
        assert maps["out_channels"] == conv.out_channels
        check_step_through(maps)


async def test_one_value_by_hand_on_a_drawn_stroke(client: httpx.AsyncClient) -> None:
    """A position on the stroke of a digit: the products are not all zero and ReLU passes it."""
    digit = held_out_digits(1)[0]
    maps = await post_maps(client, "digits", "conv1", png_bytes(digit.image))
    pre, post = array_of(maps["pre"]), array_of(maps["post"])
    channel, row, col = np.unravel_index(int(np.argmax(pre)), pre.shape)
    products, value = one_value(maps, int(channel), int(row), int(col))
    bias = float(array_of(maps["bias"])[channel])
    assert products != 0.0
    assert value == pytest.approx(products + bias)
    assert value == pytest.approx(float(pre[channel, row, col]), abs=1e-5)
    assert float(post[channel, row, col]) == pytest.approx(max(value, 0.0), abs=1e-5)


async def test_multipart_upload_gives_the_same_maps(client: httpx.AsyncClient) -> None:
    body = png_bytes(held_out_digits(1)[0].image)
    raw = await post_maps(client, "lenet5", "conv1", body)
    response = await client.post(
        "/models/lenet5/layers/conv1/maps?version=1",
        files=[("file", ("digit.png", body, "image/png"))],
    )
    assert response.status_code == 200
    assert response.json() == raw


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/models/digits/layers/fc1/maps", 404, "conv layers: conv1, conv2"),
        ("/models/digits/layers/relu1/maps", 404, "no conv layer 'relu1'"),
        ("/models/nope/layers/conv1/maps", 404, "no model named 'nope'"),
        ("/models/digits/layers/conv1/maps?version=7", 404, "no version 7"),
        ("/models/digits/layers/conv1/maps?version=latest", 404, "no version or alias"),
    ],
)
async def test_wrong_names_are_problems(
    client: httpx.AsyncClient, path: str, status: int, words: str
) -> None:
    response = await client.post(path, content=png_bytes(held_out_digits(1)[0].image), headers=PNG)
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM
    assert words in response.json()["detail"]


async def test_bad_bodies_are_problems(client: httpx.AsyncClient) -> None:
    url = "/models/digits/layers/conv1/maps"
    not_image = await client.post(url, content=b"hello", headers=PNG)
    assert not_image.status_code == 400
    assert not_image.headers["content-type"] == PROBLEM
    assert "cannot identify an image" in not_image.json()["detail"]
    body = png_bytes(held_out_digits(1)[0].image)
    files = [("file", (f"{i}.png", body, "image/png")) for i in range(2)]
    two = await client.post(url, files=files)
    assert two.status_code == 400
    assert two.json()["detail"] == "send one image to look inside a layer; got 2"
    text = await client.post(url, content=b"hello", headers={"content-type": "text/plain"})
    assert text.status_code == 415


async def test_route_is_in_the_openapi_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    operation = schema["paths"]["/models/{name}/layers/{layer}/maps"]["post"]
    assert "kernels" in operation["summary"]
    assert {p["name"] for p in operation["parameters"]} == {"name", "layer", "version", "image",
                                                            "keep"}  # fmt: skip
    answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["$ref"].endswith("/LayerMaps")
    fields = schema["components"]["schemas"]["LayerMaps"]["properties"]
    assert {"input", "weight", "bias", "pre", "post", "after", "stride", "padding"} <= set(fields)


async def test_hooks_are_removed_after_many_requests() -> None:
    app = create_app(Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE)}))
    async with app_client(app) as client:
        body = png_bytes(held_out_digits(1)[0].image)
        for layer in ["conv1", "conv2"] * 10:
            await post_maps(client, "digits", layer, body)
        await client.post("/models/digits/layers/fc1/maps", content=body, headers=PNG)
        module = app.state.runtime.catalog.resolve("digits", None).classifier.module
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
        assert hooks == 0
        predicted = await client.post("/predict", content=body, headers=PNG)
        assert predicted.status_code == 200


def test_resnet_conv1_reads_through_batch_norm_and_the_shared_relu(tmp_path: Path) -> None:
    """Stride 2, padding 3, a batch norm before an in-place ReLU module that runs many times."""
    store = ModelStore(tmp_path)
    import_torchvision(store, "resnet18", "resnet18", weights=None)
    classifier = store.load("resnet18", 1, CPU)
    model = classifier.module
    rng = np.random.default_rng(0)
    array = rng.normal(size=(3, 224, 224)).astype(np.float32)
    conv = open_convolution(classifier, array, "conv1")
    assert conv.after == [("bn1", "BatchNorm2d"), ("relu", "ReLU")]
    assert conv.pre.shape == (64, 112, 112)
    conv1, bn1 = model.get_submodule("conv1"), model.get_submodule("bn1")
    with torch.inference_mode():
        pre = conv1(torch.from_numpy(array[None]))
        post = torch.relu(bn1(pre))
    np.testing.assert_allclose(conv.pre, pre[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(conv.post, post[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(conv.received, array)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


class Odd(nn.Module):
    """Grouped, dilated, "same"-padded, strided and reflect-padded convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 4, stride=3, padding=1, bias=False, padding_mode="reflect")
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        logits: torch.Tensor = self.fc(self.flatten(self.pool(x)))
        return logits


def test_grouped_dilated_strided_convolutions_redo_by_hand() -> None:
    torch.manual_seed(0)
    module = Odd().eval()
    shape = (4, 17, 19)
    calls = trace(module, torch.zeros((1, *shape)))
    spec = ModelSpec(
        architecture="odd",
        input=InputSpec(channels=4, height=17, width=19, mean=[0.0] * 4, std=[1.0] * 4),
        labels=["a", "b", "c"],
        heatmap_layer="conv2",
        sha256="",
        created=now_iso(),
    )
    network = Network(module, CPU)
    anatomy, layers = describe(module, shape, calls), heatmap_layers(calls)
    classifier = Classifier("odd", 1, spec, "cpu", anatomy, layers, [], network)
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    for layer in ("conv1", "conv2"):
        conv = open_convolution(classifier, array, layer)
        c = conv.module
        maps = {
            "input": encode(conv.received),
            "weight": encode(conv.weight),
            "bias": None if conv.bias is None else encode(conv.bias),
            "pre": encode(conv.pre),
            "in_channels": c.in_channels,
            "out_channels": c.out_channels,
            "groups": c.groups,
            "kernel": list(c.kernel_size),
            "stride": list(c.stride),
            "padding": list(conv.padding),
            "dilation": list(c.dilation),
            "padding_mode": c.padding_mode,
        }
        check_step_through(maps)
    assert open_convolution(classifier, array, "conv1").padding == (2, 2)


def encode(array: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()
    return {"shape": list(array.shape), "data": data, "dtype": "float32"}
