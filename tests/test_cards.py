"""Model cards over HTTP and `convserve describe` / `explain`: the network's own arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from service.cli import main
from service.config import Settings
from service.registry import build_model
from service.spec import InputSpec, ModelSpec, now_iso
from service.store import ModelStore
from tests.conftest import ready_client

pytestmark = pytest.mark.anyio


def check_rows(card: dict[str, Any]) -> list[dict[str, Any]]:
    anatomy = card["anatomy"]
    assert isinstance(anatomy, dict)
    rows: list[dict[str, Any]] = anatomy["layers"]
    for row in rows:
        if row["formula_shape"] is not None:  # floor((W - K + 2P)/S) + 1 agrees with the network
            assert row["formula_shape"] == row["output_shape"], row
    return rows


async def test_card_of_the_bundled_digits_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/models/digits")
    assert response.status_code == 200
    card = response.json()
    assert (card["name"], card["version"], card["architecture"]) == ("digits", 1, "small_cnn")
    assert card["labels"] == [str(i) for i in range(10)]
    assert card["input"]["channels"] == 1
    assert card["input"]["height"] == 28
    assert card["metrics"]["accuracy"] >= 0.97
    assert card["heatmap_layer"] == "conv2"
    rows = check_rows(card)
    by_name = {row["name"]: row for row in rows}
    assert by_name["conv1"] == {
        "name": "conv1", "type": "Conv2d", "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1],
        "output_shape": [32, 28, 28], "formula_shape": [32, 28, 28], "params": 320,
        "macs": 9 * 32 * 28 * 28, "receptive_field": 3,
    }  # fmt: skip
    assert by_name["pool2"]["output_shape"] == [64, 7, 7]
    assert by_name["pool2"]["receptive_field"] == 10
    assert card["anatomy"]["total_params"] == 421_642
    assert card["anatomy"]["total_params"] == sum(row["params"] for row in rows)
    assert any("sees 10x10 pixels" in w for w in card["warnings"])
    same = (await client.get("/models/digits/1")).json()
    assert same == card
    missing = await client.get("/models/digits/9")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def _seed_spec() -> ModelSpec:
    return ModelSpec(
        architecture="small_cnn",
        arguments={"in_channels": 3, "input_size": 32, "num_classes": 10},
        input=InputSpec(channels=3, height=32, width=32, mean=[0.5] * 3, std=[0.25] * 3),
        labels=[f"class {i}" for i in range(10)],
        heatmap_layer="conv2",
        sha256="",
        created=now_iso(),
    )


async def test_seed_small_cnn_card_totals_545098(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.write("seed", build_model("small_cnn"), _seed_spec())
    async with ready_client(Settings.from_env({"CONVSERVE_STORE": str(tmp_path)})) as client:
        card = (await client.get("/models/seed")).json()
        rows = check_rows(card)
        assert card["anatomy"]["total_params"] == 545_098
        assert rows[0]["params"] == 9 * 3 * 32 + 32
        assert [r["output_shape"] for r in rows if r["type"] == "Linear"] == [[128], [10]]


async def test_resnet18_card_matches_published_figures(tmp_path: Path) -> None:
    assert main(["import", "resnet18", "--random-init", "--store", str(tmp_path)]) == 0
    env = {"CONVSERVE_STORE": str(tmp_path), "CONVSERVE_MAX_BATCH_SIZE": "2"}
    async with ready_client(Settings.from_env(env)) as client:
        card = (await client.get("/models/resnet18")).json()
        rows = check_rows(card)
        assert card["anatomy"]["total_params"] == 11_689_512
        assert 1.80e9 < card["anatomy"]["total_macs"] < 1.83e9  # "1.8 GFLOPs" (MACs)
        assert card["anatomy"]["receptive_field"] == 435
        assert card["anatomy"]["output_shape"] == [1000]
        assert len(card["labels"]) == 1000
        assert card["labels"][0] == "tench"
        assert card["input"]["resize"] == "center_crop"
        assert card["input"]["resize_size"] == 256
        assert "layer4" in [layer["name"] for layer in card["heatmap_layers"]]
        conv1 = rows[0]
        assert (conv1["name"], conv1["kernel"], conv1["output_shape"]) == (
            "conv1",
            [7, 7],
            [64, 112, 112],
        )


def test_describe_prints_the_seed_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "small_cnn", "--input", "3x32x32", "--classes", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "total parameters: 545,098"
    assert out[0].split() == [
        "layer",
        "type",
        "kernel",
        "stride",
        "pad",
        "output",
        "params",
        "MACs",
        "RF",
    ]
    assert any(line.split()[:2] == ["conv1", "Conv2d"] and "896" in line for line in out)


def test_describe_shows_a_3_to_64_conv_with_1792_parameters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["describe", "vgg11", "--input", "3x32x32", "--classes", "10"]) == 0
    first = capsys.readouterr().out.splitlines()[2].split()
    assert first[:3] == ["features.0", "Conv2d", "3x3"]
    assert "64x32x32" in first
    assert "1,792" in first


def test_describe_rejects_an_input_that_collapses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", "small_cnn", "--input", "3x3x3"]) == 2
    assert "collapses" in capsys.readouterr().err


def test_explain_writes_the_heatmap_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out.png"
    image = Path(__file__).resolve().parent.parent / "docs" / "examples" / "digit-4.jpg"
    code = main(["explain", str(image), "--model", "digits", "--layer", "conv1", "-o", str(output)])
    assert code == 0
    assert "top class '4'" in capsys.readouterr().out
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        assert picture.size == (280, 280)


def test_collapsing_input_is_refused_at_load(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    spec = _seed_spec()
    store.write("seed", build_model("small_cnn"), spec)
    folder = tmp_path / "seed" / "1" / "model.json"
    folder.write_text(folder.read_text().replace('"input_size": 32', '"input_size": 2'))
    from service.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="collapses"):
        store.load("seed", 1, torch.device("cpu"))
