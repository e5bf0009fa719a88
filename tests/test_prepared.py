"""A version served before on this machine starts without torch (service.prepared), and
everything that needs the network still works: heatmaps, layer maps, the card."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from service.errors import ModelLoadError
from service.network import full_load
from service.prepared import load_prepared
from service.spec import SPEC_FILE
from service.store import WEIGHTS_FILE, ModelStore
from tests.conftest import ready_client
from tests.support import BUNDLED_STORE, child_pids, held_out_digits, png_bytes, running_server

PNG = {"content-type": "image/png"}


def settings_for(tmp_path: Path, **changes: object) -> Settings:
    store = tmp_path / "store"
    if not store.exists():
        shutil.copytree(BUNDLED_STORE / "digits", store / "digits")
    return Settings(store=store, cache_dir=tmp_path / "cache", **changes)  # type: ignore[arg-type]


def torch_mapped(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_a_restart_serves_without_torch_until_a_heatmap_needs_it(tmp_path: Path) -> None:
    store, cache = tmp_path / "store", tmp_path / "cache"
    shutil.copytree(BUNDLED_STORE, store)
    env = {"CONVSERVE_STORE": str(store), "CONVSERVE_CACHE_DIR": str(cache),
           "CONVSERVE_WORKERS": "2"}  # fmt: skip
    body = png_bytes(held_out_digits(1)[0].image)
    runs = []
    for _ in range(2):
        with running_server(tmp_path, env) as server:
            (model,) = child_pids(server, "service.modelhost")
            unprepared = torch_mapped(model)
            predicted = httpx.post(f"{server.url}/predict", content=body, headers=PNG)
            card = httpx.get(f"{server.url}/models/digits").json()
            heatmap = httpx.post(f"{server.url}/predict?heatmap=gradcam", content=body,
                                 headers=PNG, timeout=60)  # fmt: skip
            maps = httpx.post(f"{server.url}/models/lenet5/layers/conv1/maps", content=body,
                              headers=PNG, timeout=60)  # fmt: skip
            runs.append((unprepared, predicted, card, heatmap, maps, torch_mapped(model)))
            log = server.output()
    (first, second) = runs
    assert first[0], "a store never served here loads in full, with torch"
    assert not second[0], "the restart found its versions prepared and left torch out"
    assert "digits v1: prepared on this machine" in log
    assert "lenet5 v1: prepared on this machine" in log
    for run in runs:
        assert [r.status_code for r in run[1:5] if isinstance(r, httpx.Response)] == [200] * 3
    assert second[1].json() == first[1].json()  # the same engine answers, bit for bit
    assert second[2] == first[2], "the recorded card is the card"
    assert first[2]["anatomy"]["layers"]
    assert first[2]["engine"] in ("onnxruntime", "openvino")
    a, b = (np.array(run[3].json()["results"][0]["heatmap"]["grid"]) for run in runs)
    assert np.allclose(a, b, atol=1e-5), "Grad-CAM from the network built on first need"
    assert second[4].json()["post"] == first[4].json()["post"]
    assert second[5], "the heatmap brought torch in"


@pytest.mark.anyio
async def test_a_network_that_cannot_be_built_fails_its_heatmap_alone(tmp_path: Path) -> None:
    """Weights changed under a prepared version: the heatmap gets a problem saying so, plain
    predictions keep being answered by the verified ONNX file."""
    settings = settings_for(tmp_path)
    full_load(ModelStore(settings.store).path("digits", 1), "digits", 1, settings, "cpu")
    body = png_bytes(held_out_digits(1)[0].image)
    async with ready_client(settings) as client:
        weights = settings.store / "digits" / "1" / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
        heatmap = await client.post("/predict?heatmap=gradcam", content=body, headers=PNG)
        assert heatmap.status_code == 500
        assert heatmap.headers["content-type"] == "application/problem+json"
        assert "changed or corrupted" in heatmap.json()["detail"]
        assert (await client.post("/predict", content=body, headers=PNG)).status_code == 200


def test_load_prepared_needs_both_records_for_exactly_these_files(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    folder = ModelStore(settings.store).path("digits", 1)
    assert load_prepared(folder, "digits", 1, settings, "cpu") is None  # nothing recorded yet
    full = full_load(folder, "digits", 1, settings, "cpu")
    prepared = load_prepared(folder, "digits", 1, settings, "cpu")
    assert prepared is not None
    assert full.engine.name == prepared.engine.name != "torch"
    assert not prepared.has_network
    assert prepared.anatomy == full.anatomy
    assert prepared.layers == full.layers
    assert prepared.warnings == full.warnings
    arrays = [np.random.default_rng(0).normal(size=(1, 28, 28)).astype(np.float32)] * 3
    assert np.array_equal(prepared.predict(arrays), full.predict(arrays))
    explained = prepared.explain(arrays, "gradcam", None, [None] * 3)
    assert np.allclose(explained.grids, full.explain(arrays, "gradcam", None, [None] * 3).grids)
    assert prepared.has_network

    # another CPU-side setting or file means working it out again, never trusting the record
    assert load_prepared(folder, "digits", 1, settings_for(tmp_path, threads=1), "cpu") is None
    assert load_prepared(folder, "digits", 1, settings_for(tmp_path, engine="torch"), "cpu") is None
    assert load_prepared(folder, "digits", 1, settings, "cuda") is None
    spec = json.loads((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "description": "retrained"}))
    assert load_prepared(folder, "digits", 1, settings, "cpu") is None


def test_forced_onnx_engines_are_prepared_and_torch_never_is(tmp_path: Path) -> None:
    folder = ModelStore(settings_for(tmp_path).store).path("digits", 1)
    for engine, prepared in (("torch", False), ("onnxruntime", True), ("openvino", True)):
        settings = settings_for(tmp_path, engine=engine)
        assert full_load(folder, "digits", 1, settings, "cpu").engine.name == engine
        assert (load_prepared(folder, "digits", 1, settings, "cpu") is not None) is prepared


def test_a_prepared_version_whose_weights_changed_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    folder = ModelStore(settings.store).path("digits", 1)
    full_load(folder, "digits", 1, settings, "cpu")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelLoadError, match="the file was changed or corrupted"):
        load_prepared(folder, "digits", 1, settings, "cpu")
