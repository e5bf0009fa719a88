"""The ONNX file's engines (ONNX Runtime and OpenVINO): the file written beside the weights by
import and train, exported into the cache (never the store) by a server that finds none; each
engine verified against torch before it serves, chosen by policy or by measurement, and never
trusted when it disagrees."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from service.config import Settings
from service.decisions import Decision
from service.engines import (
    ONNX_FILE,
    ONNX_META,
    OnnxEngine,
    OnnxMeta,
    check_agreement,
)
from service.importing import import_torchvision
from service.spec import sha256_file
from service.store import ModelStore
from service.torch_engine import ensure_onnx, select_engine
from tests.conftest import ready_client
from tests.support import BUNDLED_STORE, held_out_digits, png_bytes

pytestmark = pytest.mark.anyio
CPU = torch.device("cpu")


def copy_digits(tmp_path: Path) -> ModelStore:
    shutil.copytree(BUNDLED_STORE / "digits", tmp_path / "digits")
    return ModelStore(tmp_path)


def test_bundled_models_ship_a_verified_onnx_file() -> None:
    store = ModelStore(BUNDLED_STORE)
    for name in store.names():
        folder = store.path(name, 1)
        meta = msgspec.json.decode((folder / ONNX_META).read_bytes(), type=OnnxMeta)
        assert meta.sha256 == sha256_file(folder / ONNX_FILE)
        classifier = store.load(name, 1, CPU)
        assert meta.weights_sha256 == classifier.spec.sha256
        onnx = OnnxEngine(folder / ONNX_FILE, None)
        assert check_agreement(onnx, classifier.torch_engine, classifier.input_shape) < 1e-4


def test_train_and_import_write_the_onnx_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    import_torchvision(store, "resnet18", "resnet18", weights=None)
    folder = store.path("resnet18", 1)
    assert (folder / ONNX_FILE).is_file()
    classifier = store.load("resnet18", 1, CPU)
    onnx = OnnxEngine(folder / ONNX_FILE, None)
    assert check_agreement(onnx, classifier.torch_engine, classifier.input_shape) < 1e-4


def test_stale_or_missing_exports_are_redone_in_the_cache(tmp_path: Path) -> None:
    store = copy_digits(tmp_path / "store")
    folder = store.path("digits", 1)
    classifier = store.load("digits", 1, CPU)
    args = (classifier.module, classifier.input_shape, folder, classifier.spec.sha256)
    cache = tmp_path / "cache"
    (folder / ONNX_FILE).write_bytes(b"tampered")  # no longer matches its recorded hash
    path = ensure_onnx(*args, cache)
    assert path == cache / "onnx" / classifier.spec.sha256 / ONNX_FILE
    meta = msgspec.json.decode((path.parent / ONNX_META).read_bytes(), type=OnnxMeta)
    assert meta.sha256 == sha256_file(path)
    assert (folder / ONNX_FILE).read_bytes() == b"tampered"  # the store is left as it was
    (folder / ONNX_FILE).unlink()
    (folder / ONNX_META).unlink()
    assert ensure_onnx(*args, cache) == path  # found in the cache, not exported again
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]


async def test_serving_never_writes_to_the_store(tmp_path: Path) -> None:
    """A store without exported files (copied by hand, or written by another tool) is served
    with an export in CONVSERVE_CACHE_DIR; the store's files stay byte for byte as they were."""
    store = copy_digits(tmp_path / "store")
    folder = store.path("digits", 1)
    (folder / ONNX_FILE).unlink()
    (folder / ONNX_META).unlink()
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    env = {"CONVSERVE_STORE": str(store.root), "CONVSERVE_ENGINE": "onnxruntime",
           "CONVSERVE_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    async with ready_client(Settings.from_env(env)) as client:
        assert (await client.get("/models/digits")).json()["engine"] == "onnxruntime"
        digit = held_out_digits(1)[0]
        files = {"file": ("d.png", png_bytes(digit.image), "image/png")}
        assert (await client.post("/predict", files=files)).status_code == 200
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert list((tmp_path / "cache" / "onnx").glob("*/" + ONNX_FILE))


def test_policies_and_a_disagreeing_export(tmp_path: Path) -> None:
    store = copy_digits(tmp_path)
    folder = store.path("digits", 1)
    classifier = store.load("digits", 1, CPU)
    args = (classifier.module, classifier.torch_engine, classifier.input_shape, folder,
            classifier.spec.sha256, tmp_path / "cache")  # fmt: skip
    assert select_engine(*args, "torch", None, 8).name == "torch"
    assert select_engine(*args, "onnxruntime", None, 8).name == "onnxruntime"
    assert select_engine(*args, "openvino", None, 8).name == "openvino"
    assert select_engine(*args, "auto", None, 8).name in {"torch", "onnxruntime", "openvino"}
    # an ONNX file of another network, with a sidecar that vouches for it: numbers decide
    lenet = BUNDLED_STORE / "lenet5" / "1" / ONNX_FILE
    shutil.copy(lenet, folder / ONNX_FILE)
    meta = OnnxMeta(sha256_file(folder / ONNX_FILE), classifier.spec.sha256, 18, "test")
    (folder / ONNX_META).write_bytes(msgspec.json.encode(meta))
    assert select_engine(*args, "onnxruntime", None, 8).name == "torch"
    assert select_engine(*args, "openvino", None, 8).name == "torch"
    assert select_engine(*args, "auto", None, 8).name == "torch"


async def test_both_engines_answer_alike_over_http(tmp_path: Path) -> None:
    digits = held_out_digits(16)
    files = [("file", (f"{i}.png", png_bytes(d.image), "image/png")) for i, d in enumerate(digits)]
    answers = {}
    for engine in ("torch", "onnxruntime", "openvino"):
        env = {"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_ENGINE": engine}
        async with ready_client(Settings.from_env(env)) as client:
            card = (await client.get("/models/digits")).json()
            assert card["engine"] == engine
            status = (await client.get("/models")).json()["models"][0]["versions"][0]
            assert status["engine"] == engine
            response = await client.post("/predict?top_k=10", files=files)
            answers[engine] = np.array([
                [p["probability"] for p in sorted(r["predictions"], key=lambda p: p["class_index"])]
                for r in response.json()["results"]
            ])  # fmt: skip
    np.testing.assert_allclose(answers["torch"], answers["onnxruntime"], atol=1e-5)
    np.testing.assert_allclose(answers["torch"], answers["openvino"], atol=1e-5)
    assert (answers["torch"].argmax(1) == [d.label for d in digits]).mean() > 0.9


def test_the_auto_decision_is_recorded_and_only_trusted_for_the_same_facts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart reuses the measurement; a record from another machine, library or export, or
    a broken one, is measured again and replaced."""
    store = copy_digits(tmp_path / "store")
    folder = store.path("digits", 1)
    classifier = store.load("digits", 1, CPU)
    cache = tmp_path / "cache"
    args = (classifier.module, classifier.torch_engine, classifier.input_shape, folder,
            classifier.spec.sha256, cache, "auto", None, 8)  # fmt: skip
    record = cache / "engines" / f"{classifier.spec.sha256}.json"
    caplog.set_level(logging.INFO, logger="convserve.engines")

    first = select_engine(*args).name
    measured = msgspec.json.decode(record.read_bytes(), type=Decision)
    assert measured.engine == first
    assert set(measured.timings_ms) == {"torch", "onnxruntime", "openvino"}
    assert set(measured.differences) == {"onnxruntime", "openvino"}
    assert max(measured.differences.values()) < 1e-4
    assert measured.facts["onnx_sha256"] == sha256_file(folder / ONNX_FILE)
    assert measured.facts["torch"] == torch.__version__

    caplog.clear()
    assert select_engine(*args).name == first
    assert "recorded for this machine" in caplog.text
    assert msgspec.json.decode(record.read_bytes(), type=Decision) == measured

    other = "torch" if first != "torch" else "onnxruntime"
    for fact, value in [("cpu", "another machine's CPU"), ("onnxruntime", "0.0.1"),
                        ("openvino", "2000.1"), ("engines", "onnxruntime"),
                        ("onnx_sha256", "0" * 64), ("threads", "64")]:  # fmt: skip
        forged = Decision({**measured.facts, fact: value}, other, 0.0, {other: 0.001})
        record.write_bytes(msgspec.json.encode(forged))
        caplog.clear()
        select_engine(*args)
        assert f"worked out with another {fact}" in caplog.text
        remeasured = msgspec.json.decode(record.read_bytes(), type=Decision)
        assert remeasured.facts == measured.facts
        assert set(remeasured.timings_ms) == {"torch", "onnxruntime", "openvino"}

    record.write_bytes(b"{not json")
    select_engine(*args)
    assert msgspec.json.decode(record.read_bytes(), type=Decision).facts == measured.facts
