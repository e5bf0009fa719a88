"""Model cards over HTTP and `convserve describe` / `explain`: the network's own arithmetic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from service.cli import main
from service.config import Settings
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


async def test_seed_small_cnn_card_totals_545098(tmp_path: Path) -> None:
    assert main(["import", "small_cnn", "--name", "seed", "--random-init", "--input", "3x32x32",
                 "--store", str(tmp_path)]) == 0  # fmt: skip
    async with ready_client(Settings.from_env({"CONVSERVE_STORE": str(tmp_path)})) as client:
        card = (await client.get("/models/seed")).json()
        rows = check_rows(card)
        assert card["anatomy"]["total_params"] == 545_098
        assert rows[0]["params"] == 9 * 3 * 32 + 32
        assert [r["output_shape"] for r in rows if r["type"] == "Linear"] == [[128], [10]]


def test_import_sizes_our_own_architectures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """small_cnn/lenet5 take --input and --classes; weights trained elsewhere come in strictly."""
    bundled = Path(__file__).resolve().parent.parent / "model_store"
    weights = bundled / "lenet5" / "1" / "weights.safetensors"
    assert main(["import", "lenet5", "--weights", str(weights), "--input", "1x28x28",
                 "--store", str(tmp_path)]) == 0  # fmt: skip
    device = torch.device("cpu")
    ours = ModelStore(tmp_path).load("lenet5", 1, device)
    theirs = ModelStore(bundled).load("lenet5", 1, device)
    assert ours.spec.input.channel_order == "L"
    assert ours.spec.labels == [f"class {i}" for i in range(10)]
    batch = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(ours.module(batch), theirs.module(batch))
    # the weights must fit the shape asked for, and the input must fit the network
    assert main(["import", "lenet5", "--weights", str(weights), "--classes", "5",
                 "--store", str(tmp_path)]) == 2  # fmt: skip
    assert "size mismatch" in capsys.readouterr().err
    assert main(["import", "resnet18", "--random-init", "--input", "1x224x224",
                 "--store", str(tmp_path)]) == 2  # fmt: skip
    assert "takes 3-channel input, not 1x224x224; --input 3x224x224 fits" in capsys.readouterr().err
    assert main(["import", "small_cnn", "--random-init", "--classes", "3", "--input", "3x64x48",
                 "--store", str(tmp_path)]) == 0  # fmt: skip
    seed = ModelStore(tmp_path).load("small_cnn", 1, device)
    assert (seed.spec.input.height, seed.spec.input.width, len(seed.spec.labels)) == (64, 48, 3)


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
    assert main(["import", "small_cnn", "--name", "seed", "--random-init",
                 "--store", str(tmp_path)]) == 0  # fmt: skip
    path = tmp_path / "seed" / "1" / "model.json"
    card = json.loads(path.read_text())
    card["arguments"]["input_size"] = [2, 2]
    path.write_text(json.dumps(card))
    from service.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="collapses"):
        ModelStore(tmp_path).load("seed", 1, torch.device("cpu"))
