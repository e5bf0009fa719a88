"""Bring your own model: ONNX, TorchScript and torch.export files made here from torchvision's
mobilenet_v3_small, imported with `convserve import FILE`, served over HTTP by a real server,
and checked against the same network run in process."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import onnx
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data as samples
from torch import nn

from service.anatomy import describe
from service.graph_files import load_graph_only
from service.imaging import DecodeLimits, prepare_image
from service.spec import read_spec
from tests.support import ServerProcess, resent, run_cli, running_server

SHAPE = (3, 224, 224)
LABELS = [f"kind {i}" for i in range(10)]
JPEG = {"content-type": "image/jpeg"}


class Softmaxed(nn.Module):
    """A network that applies softmax itself (the seed's double-softmax trap)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class ChannelsLast(nn.Module):
    """A network that takes NHWC images, as Keras exports do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.inner(x.permute(0, 3, 1, 2))
        return logits


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["input"], dynamic_shapes=shapes
        )
    assert program is not None
    program.save(str(path), external_data=False)


@functools.cache
def _network() -> nn.Module:
    """mobilenet_v3_small with seeded weights whose answers differ from image to image: batch
    norm statistics measured on noise, and a classifier with a spread of weights."""
    torch.manual_seed(0)
    network = torchvision.models.mobilenet_v3_small(num_classes=len(LABELS))
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
    with torch.no_grad():
        network.train()
        for _ in range(3):
            network(torch.rand(8, *SHAPE) * 4 - 2)
        for layer in network.classifier:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=3.0 / layer.in_features**0.5)
    network.eval()
    return cast("nn.Module", network)


@functools.cache
def _max_pooled() -> nn.Module:
    """The same network ending in a global max pool instead of the average."""
    network = copy.deepcopy(_network())
    network.avgpool = nn.AdaptiveMaxPool2d(1)
    return network


def _reference(name: str) -> nn.Module:
    return _max_pooled() if name == "no_twin" else _network()


def _global_max_pool(source: Path, target: Path) -> None:
    """`source` with its final pooling as ONNX's GlobalMaxPool, an op onnx2torch has no
    converter for: the network of _max_pooled, in a graph torch cannot run."""
    model = onnx.load(str(source))
    nodes = model.graph.node
    index, pool = [(i, n) for i, n in enumerate(nodes) if n.op_type == "ReduceMean"][-1]
    nodes.remove(pool)
    nodes.insert(index, onnx.helper.make_node("GlobalMaxPool", [pool.input[0]], [pool.output[0]]))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("files")
    network = _network()
    one = torch.randn(1, *SHAPE)
    made = {
        "fixed": folder / "fixed.onnx",
        "dynamic": folder / "dynamic.onnx",
        "scripted": folder / "scripted.pt",
        "exported": folder / "exported.pt2",
        "nhwc": folder / "nhwc.onnx",
        "softmax": folder / "softmax.pt",
        "no_twin": folder / "no_twin.onnx",
    }
    _onnx(network, one, made["fixed"], dynamic=False)
    _onnx(network, torch.randn(2, *SHAPE), made["dynamic"], dynamic=True)
    _global_max_pool(made["dynamic"], made["no_twin"])
    with warnings.catch_warnings():  # TorchScript is deprecated, and still what people have
        warnings.simplefilter("ignore")
        for name, module in (("scripted", network), ("softmax", Softmaxed(network).eval())):
            torch.jit.trace(module, one).save(str(made[name]))  # type: ignore[no-untyped-call]
    torch.export.save(torch.export.export(network, (one,)), str(made["exported"]))
    _onnx(ChannelsLast(network).eval(), one.permute(0, 2, 3, 1), made["nhwc"], dynamic=False)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (folder / "labels.json").write_text(json.dumps(LABELS[:9]))
    return made


@pytest.fixture(scope="module")
def imported(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each file through the command a user types; its output, per model."""
    store = tmp_path_factory.mktemp("store")
    labels = files["fixed"].parent / "labels.txt"
    outputs = {}
    for name, path in files.items():
        result = run_cli("import", path, "--name", name, "--labels", labels,
                         "--store", store, cwd=store)  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[name] = result.stdout
    (store / "outputs.json").write_text(json.dumps(outputs))
    return store


@pytest.fixture(scope="module")
def server(imported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    logs = tmp_path_factory.mktemp("logs")
    with running_server(logs, {"CONVSERVE_STORE": str(imported)}) as running:
        yield running


def _photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(samples.chelsea()).save(buffer, "JPEG", quality=90)  # type: ignore[no-untyped-call]
    return buffer.getvalue()


def _expected(store: Path, name: str, picture: bytes) -> np.ndarray:
    """The original network's probabilities on the picture as the version preprocesses it."""
    spec = read_spec(store / name / "1" / "model.json")
    array = prepare_image(picture, spec.input, DecodeLimits(max_pixels=50_000_000)).array
    with torch.inference_mode():
        logits = _reference(name)(torch.from_numpy(array)[None])
    return torch.softmax(logits, dim=1)[0].numpy()


def _probabilities(body: dict[str, object]) -> np.ndarray:
    results = body["results"]
    assert isinstance(results, list)
    found = np.zeros(len(LABELS))
    for row in results[0]["predictions"]:
        found[row["class_index"]] = row["probability"]
        assert row["label"] == LABELS[row["class_index"]]
    return found


def test_every_format_imports_with_what_was_done_said(imported: Path) -> None:
    outputs = json.loads((imported / "outputs.json").read_text())
    assert "rewritten to dynamic" in outputs["fixed"]
    assert "rewritten" not in outputs["dynamic"]
    assert "loop" not in outputs["dynamic"]
    assert "NHWC" in outputs["nhwc"]
    assert "ends in softmax" in outputs["softmax"]
    for name in outputs:
        spec = read_spec(imported / name / "1" / "model.json")
        assert spec.architecture == "graph"
        assert spec.input.mean == pytest.approx([0.485, 0.456, 0.406])
        assert (spec.input.resize, spec.input.resize_size) == ("center_crop", 256)
        assert spec.labels == LABELS
        assert (imported / name / "1" / "model.onnx").is_file()
    softmax = read_spec(imported / "softmax" / "1" / "model.json")
    assert softmax.arguments["output"] == "softmax"
    assert read_spec(imported / "nhwc" / "1" / "model.json").arguments["layout"] == "NHWC"
    batching = {n: read_spec(imported / n / "1" / "model.json").arguments["batch"] for n in outputs}
    assert batching["fixed"] == "rewritten"
    assert batching["dynamic"] == "dynamic"
    assert batching["scripted"] in ("dynamic", "rewritten")


@pytest.mark.parametrize(
    "name", ["fixed", "dynamic", "scripted", "exported", "nhwc", "softmax", "no_twin"]
)
def test_served_answers_agree_with_the_network_in_process(
    server: ServerProcess, imported: Path, name: str
) -> None:
    picture = _photo()
    response = httpx.post(
        f"{server.url}/models/{name}/predict?top_k=10", content=picture,
        headers={"content-type": "image/jpeg"}, timeout=60,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    got = _probabilities(response.json())
    expected = _expected(imported, name, picture)
    assert expected.max() > 0.15  # not a uniform answer that anything would match
    assert np.allclose(got, expected, atol=1e-4), (got, expected)


async def _concurrent(url: str, pictures: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        return await asyncio.gather(*[
            client.post(url, content=p, headers={"content-type": "image/png"}) for p in pictures
        ])  # fmt: skip


def _tinted(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["fixed", "nhwc", "no_twin"])
def test_a_fixed_batch_still_serves_concurrent_images_correctly(
    server: ServerProcess, imported: Path, name: str
) -> None:
    """`fixed` was rewritten to a dynamic batch; `nhwc` runs image by image: both must give
    every image its own answer when requests arrive together and share a forward pass."""
    pictures = [_tinted(seed) for seed in range(12)]
    url = f"{server.url}/models/{name}/predict?top_k=10"
    responses = asyncio.run(_concurrent(url, pictures))
    for picture, response in zip(pictures, responses, strict=True):
        assert response.status_code == 200, response.text
        assert np.allclose(_probabilities(response.json()), _expected(imported, name, picture),
                           atol=1e-4)  # fmt: skip
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'convserve_batch_size_count{{model="{name}"' in metrics


@pytest.mark.parametrize("name", ["fixed", "nhwc"])
def test_heatmaps_in_a_shared_forward_pass_match_each_image_alone(
    server: ServerProcess, name: str
) -> None:
    """`nhwc` runs image by image, so its heatmaps are taken image by image too."""
    url = f"{server.url}/models/{name}/predict?heatmap=gradcam"
    pictures = [_tinted(seed) for seed in range(20, 26)]
    alone = [
        httpx.post(url, content=p, headers={"content-type": "image/png"}, timeout=60)
        for p in pictures
    ]
    # the same pixels in other bytes: the response cache does not answer them
    again = [resent(Image.open(io.BytesIO(p))) for p in pictures]
    together = asyncio.run(_concurrent(url, again))
    for first, second in zip(alone, together, strict=True):
        assert first.status_code == second.status_code == 200, second.text
        one, other = first.json()["results"][0], second.json()["results"][0]
        assert one["heatmap"]["class_index"] == other["heatmap"]["class_index"]
        assert np.allclose(one["heatmap"]["grid"], other["heatmap"]["grid"], atol=1e-3)


@pytest.mark.parametrize("name", ["exported", "scripted", "fixed", "nhwc"])
def test_heatmaps_and_the_card_come_from_the_graph(server: ServerProcess, name: str) -> None:
    card = httpx.get(f"{server.url}/models/{name}", timeout=30)
    assert card.status_code == 200, card.text
    layers = card.json()
    text = json.dumps(layers)
    assert "Conv2d" in text
    response = httpx.post(
        f"{server.url}/models/{name}/predict?heatmap=gradcam", content=_photo(),
        headers={"content-type": "image/jpeg", "accept": "image/png"}, timeout=60,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(response.content)).size[0] > 100


def test_a_graph_torch_cannot_run_serves_without_heatmaps(
    server: ServerProcess, imported: Path
) -> None:
    """onnx2torch has no converter for GlobalMaxPool: ONNX Runtime serves the graph (answers
    checked above), the card comes from the graph and says why there are no heatmaps, and
    every heatmap or layer-map request gets a 422 problem saying the same."""
    outputs = json.loads((imported / "outputs.json").read_text())
    assert "no converter for GlobalMaxPool" in outputs["no_twin"]
    assert "heatmaps and layer maps are unavailable" in outputs["no_twin"]
    assert "engine on this machine: onnxruntime" in outputs["no_twin"]
    response = httpx.get(f"{server.url}/models/no_twin", timeout=30)
    assert response.status_code == 200, response.text
    card = response.json()
    assert "no converter for GlobalMaxPool" in card["heatmaps_unavailable"]
    assert any("heatmaps unavailable" in warning for warning in card["warnings"])
    assert card["engine"] == "onnxruntime"
    assert card["heatmap_layers"] == []
    # the card read from the graph: the multiply-adds and receptive field torch counts
    expected = describe(_max_pooled(), SHAPE)
    anatomy = card["anatomy"]
    assert anatomy["total_macs"] == expected.total_macs
    assert anatomy["receptive_field"] == expected.receptive_field
    assert anatomy["output_shape"] == [len(LABELS)]
    convs = [row for row in anatomy["layers"] if row["type"] == "Conv"]
    assert convs[0]["output_shape"] == [16, 112, 112] == convs[0]["formula_shape"]
    assert (convs[0]["kernel"], convs[0]["stride"]) == ([3, 3], [2, 2])
    picture = _photo()
    for url in (
        f"{server.url}/models/no_twin/predict?heatmap=gradcam",
        f"{server.url}/models/no_twin/predict?heatmap=activation",
        f"{server.url}/models/no_twin/layers/{convs[0]['name']}/maps",
    ):
        refused = httpx.post(url, content=picture, headers=JPEG, timeout=60)
        assert refused.status_code == 422, (url, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert "no converter for GlobalMaxPool" in refused.json()["detail"]
    served = httpx.post(f"{server.url}/models/no_twin/predict", content=picture, headers=JPEG)
    assert served.status_code == 200, served.text


def test_openvino_serves_a_graph_torch_cannot_run_when_asked(imported: Path) -> None:
    """Checked against ONNX Runtime, the only reference there is without torch."""
    folder = imported / "no_twin" / "1"
    by_default = load_graph_only(folder, "no_twin", 1, None)
    forced = load_graph_only(folder, "no_twin", 1, None, "openvino")
    assert by_default is not None
    assert forced is not None
    assert (by_default.engine.name, forced.engine.name) == ("onnxruntime", "openvino")
    images = list(np.random.default_rng(2).standard_normal((5, *SHAPE)).astype(np.float32))
    assert np.allclose(by_default.predict(images), forced.predict(images), atol=1e-5)


def test_the_v2_route_takes_fp32_tensors_for_an_imported_model(server: ServerProcess) -> None:
    meta = httpx.get(f"{server.url}/v2/models/exported", timeout=10)
    assert meta.status_code == 200, meta.text
    inputs = {i["name"]: i for i in meta.json()["inputs"]}
    assert inputs["input"]["shape"] == [-1, *SHAPE]
    tensor = np.random.default_rng(1).standard_normal((1, *SHAPE)).astype(np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, *SHAPE], "datatype": "FP32",
                        "data": tensor.ravel().tolist()}]}  # fmt: skip
    response = httpx.post(f"{server.url}/v2/models/exported/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    with torch.inference_mode():
        expected = torch.softmax(_network()(torch.from_numpy(tensor)), dim=1)[0].numpy()
    assert np.allclose(outputs["probabilities"]["data"], expected, atol=1e-4)


def test_refusals_say_what_to_do(files: dict[str, Path], tmp_path: Path) -> None:
    folder = files["fixed"].parent
    wrong = run_cli("import", files["dynamic"], "--name", "wrong", "--labels",
                    folder / "labels.json", "--store", tmp_path, cwd=tmp_path)  # fmt: skip
    assert wrong.returncode != 0
    assert "10 outputs per image" in wrong.stderr
    assert "9 labels" in wrong.stderr
    shape = run_cli("import", files["fixed"], "--name", "shape", "--input", "1x28x28",
                    "--store", tmp_path, cwd=tmp_path)  # fmt: skip
    assert shape.returncode != 0
    assert "takes 3x224x224" in shape.stderr
    scaled = run_cli("import", files["scripted"], "--name", "scaled", "--mean", "127,127,127",
                     "--std", "58,57,57", "--store", tmp_path, cwd=tmp_path)  # fmt: skip
    assert scaled.returncode != 0
    assert "look like 0..255 values" in scaled.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    bad = run_cli("import", junk, "--name", "junk", "--store", tmp_path, cwd=tmp_path)
    assert bad.returncode != 0
    assert "not a valid ONNX model" in bad.stderr
    state = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, state)
    dict_file = run_cli("import", state, "--name", "state", "--store", tmp_path, cwd=tmp_path)
    assert dict_file.returncode != 0
    assert "--weights" in dict_file.stderr
    assert not (tmp_path / "wrong").exists()
    assert not (tmp_path / "junk").exists()
    assert not (tmp_path / "scaled").exists()
