"""`convserve import FILE --quantize int8 --calibrate DIR`: the bundled digits network's ONNX
file quantized on real MNIST digits, served over HTTP, and measured against the float one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from service.spec import read_spec
from tests.support import (
    BUNDLED_STORE,
    ServerProcess,
    held_out_digits,
    png_bytes,
    run_cli,
    running_server,
)

FLOAT = BUNDLED_STORE / "digits" / "1" / "model.onnx"
PNG = {"content-type": "image/png"}


def write_digits(folder: Path, start: int, count: int) -> None:
    folder.mkdir(parents=True)
    for index, digit in enumerate(held_out_digits(start + count)[start:]):
        (folder / f"{index:03d}-{digit.label}.png").write_bytes(png_bytes(digit.image))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int8")
    write_digits(root / "calibrate", 0, 60)
    write_digits(root / "held-out", 60, 40)
    (root / "labels.txt").write_text("\n".join(map(str, range(10))))
    runs = {}
    quantize: list[str | Path] = ["--quantize", "int8", "--calibrate", root / "calibrate"]
    variants: dict[str, list[str | Path]] = {
        "float": [], "int8": quantize, "int8held": [*quantize, "--held-out", root / "held-out"],
    }  # fmt: skip
    for name, extra in variants.items():
        result = run_cli("import", FLOAT, "--name", name, "--labels", root / "labels.txt",
                         "--store", root / "store", *extra, cwd=root)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[name] = result.stdout
    (root / "store" / "outputs.json").write_text(json.dumps(runs))
    return root / "store"


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("logs"), {"CONVSERVE_STORE": str(store)}) as up:
        yield up


def test_the_int8_version_records_what_it_costs(store: Path) -> None:
    outputs = json.loads((store / "outputs.json").read_text())
    assert "int8: top-1 agrees with the float graph on" in outputs["int8"]
    assert "of 12 held-out images" in outputs["int8"]  # every fifth of 60
    assert "of 40 held-out images" in outputs["int8held"]
    for name, held in (("int8", 12), ("int8held", 40)):
        facts = read_spec(store / name / "1" / "model.json").arguments["quantization"]
        assert facts["type"] == "int8"
        assert facts["held_out_images"] == held
        assert facts["calibration_images"] == (48 if name == "int8" else 60)
        assert facts["top1_agreement"] >= 0.9
        assert facts["speedup"] == pytest.approx(facts["float_ms"] / facts["int8_ms"], rel=0.02)
    graph = onnx.load(str(store / "int8" / "1" / "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    integers = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in integers) > 400_000  # the weights themselves


def test_the_int8_version_serves_and_agrees_with_the_float_one(server: ServerProcess) -> None:
    digits = held_out_digits(200)[100:]
    top = {}
    for name in ("float", "int8"):
        answers = []
        for digit in digits:
            url = f"{server.url}/models/{name}/predict"
            response = httpx.post(url, content=png_bytes(digit.image), headers=PNG, timeout=30)
            assert response.status_code == 200, response.text
            answers.append(int(response.json()["results"][0]["predictions"][0]["label"]))
        top[name] = np.array(answers)
    assert (top["int8"] == top["float"]).mean() >= 0.95
    labels = np.array([d.label for d in digits])
    assert (top["int8"] == labels).mean() >= (top["float"] == labels).mean() - 0.05
    card = httpx.get(f"{server.url}/models/int8", timeout=30).json()
    assert card["engine"] == "onnxruntime"
    assert card["arguments"]["quantization"]["top1_agreement"] >= 0.9
    assert "INT8 graph" in card["heatmaps_unavailable"]
    float_card = httpx.get(f"{server.url}/models/float", timeout=30).json()
    assert card["anatomy"]["total_macs"] == float_card["anatomy"]["total_macs"]
    refused = httpx.post(f"{server.url}/models/int8/predict?heatmap=gradcam",
                         content=png_bytes(digits[0].image), headers=PNG, timeout=30)  # fmt: skip
    assert refused.status_code == 422
    assert "import the file without --quantize" in refused.json()["detail"]


def test_quantizing_refuses_what_cannot_work(tmp_path: Path) -> None:
    alone = run_cli("import", FLOAT, "--name", "q", "--quantize", "int8",
                    "--store", tmp_path / "store", cwd=tmp_path)  # fmt: skip
    assert alone.returncode == 2
    assert "--quantize int8 and --calibrate DIR go together" in alone.stderr
    write_digits(tmp_path / "few", 0, 5)
    (tmp_path / "few" / "notes.txt").write_text("not an image")
    few = run_cli("import", FLOAT, "--name", "q", "--quantize", "int8", "--calibrate",
                  tmp_path / "few", "--store", tmp_path / "store", cwd=tmp_path)  # fmt: skip
    assert few.returncode != 0
    assert "quantizing needs at least 8" in few.stderr
    assert "notes.txt" in few.stderr
    assert not (tmp_path / "store" / "q").exists()
