"""Model store: round trip, and every validation failure refused with its reason."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from service.errors import ModelLoadError
from service.registry import (
    ARCHITECTURES,
    Architecture,
    SmallCNN,
    build_model,
    register_architecture,
)
from service.spec import InputSpec, ModelSpec, now_iso, sha256_file
from service.store import ModelStore

CPU = torch.device("cpu")


class SoftmaxCNN(SmallCNN):
    """A deliberately broken model: it applies softmax itself (the seed's double-softmax bug)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(super().forward(x), dim=1)


class LogSoftmaxCNN(SmallCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(super().forward(x), dim=1)


for _arch in (
    Architecture("test_softmax_cnn", SoftmaxCNN, "conv2", "SmallCNN ending in softmax"),
    Architecture("test_log_softmax_cnn", LogSoftmaxCNN, "conv2", "SmallCNN ending in log_softmax"),
):
    if _arch.name not in ARCHITECTURES:
        register_architecture(_arch)


def digits_spec(**changes: Any) -> ModelSpec:
    spec = ModelSpec(
        architecture="small_cnn",
        arguments={"in_channels": 1, "input_size": 28, "num_classes": 10},
        input=InputSpec(
            channels=1, height=28, width=28, mean=[0.13], std=[0.31], channel_order="L"
        ),
        labels=[str(i) for i in range(10)],
        heatmap_layer="conv2",
        sha256="",
        created=now_iso(),
    )
    return msgspec.structs.replace(spec, **changes)


def write(store: ModelStore, spec: ModelSpec | None = None, module: nn.Module | None = None) -> int:
    spec = spec or digits_spec()
    torch.manual_seed(0)
    return store.write("m", module or build_model(spec.architecture, spec.arguments), spec)


def edit_json(store: ModelStore, version: int, edit: Callable[[dict[str, Any]], None]) -> None:
    path = store.root / "m" / str(version) / "model.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def refused(store: ModelStore, version: int = 1) -> str:
    with pytest.raises(ModelLoadError) as info:
        store.load("m", version, CPU)
    assert info.value.name == "m"
    assert info.value.version == version
    return info.value.reason


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    torch.manual_seed(1)
    module = build_model(
        "small_cnn", {"in_channels": 1, "input_size": 28, "num_classes": 10}
    ).eval()
    assert write(store, module=module) == 1
    assert write(store, module=module) == 2
    assert store.names() == ["m"]
    assert store.versions("m") == [1, 2]
    folder = tmp_path / "m" / "2"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.json",
        "model.onnx",
        "model.onnx.json",
        "weights.safetensors",
    ]
    spec = json.loads((folder / "model.json").read_text())
    assert spec["sha256"] == sha256_file(folder / "weights.safetensors")
    classifier = store.load("m", 2, CPU)
    batch = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    expected = torch.softmax(module(torch.from_numpy(batch)), dim=1).detach().numpy()
    np.testing.assert_allclose(classifier.predict(list(batch)), expected, atol=1e-6)
    assert classifier.anatomy.total_params == 421_642


def test_changed_weights_fail_the_hash(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    weights = tmp_path / "m" / "1" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "the file was changed or corrupted" in refused(store)


def test_missing_weights(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    (tmp_path / "m" / "1" / "weights.safetensors").unlink()
    assert refused(store) == "weights.safetensors is missing"


def _replace_weights(store: ModelStore, state: dict[str, torch.Tensor]) -> None:
    weights = store.root / "m" / "1" / "weights.safetensors"
    save_file(state, str(weights))
    edit_json(store, 1, lambda d: d.update(sha256=sha256_file(weights)))


def test_wrong_keys_and_shapes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    state = build_model(
        "small_cnn", {"in_channels": 1, "input_size": 28, "num_classes": 10}
    ).state_dict()
    state["fc2.weight"] = torch.zeros(12, 128)
    state["extra.bias"] = torch.zeros(3)
    del state["conv1.bias"]
    _replace_weights(store, state)
    reason = refused(store)
    assert "missing keys conv1.bias" in reason
    assert "unexpected keys extra.bias" in reason
    assert "wrong shapes fc2.weight [12, 128] (expected [10, 128])" in reason


def test_weights_that_are_not_safetensors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    weights = tmp_path / "m" / "1" / "weights.safetensors"
    weights.write_bytes(b"\x80\x04pickle-looking bytes")
    edit_json(store, 1, lambda d: d.update(sha256=sha256_file(weights)))
    assert "not a readable safetensors file" in refused(store)


def test_label_count_must_match_the_output_width(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, digits_spec(labels=[str(i) for i in range(12)]))
    assert "outputs of shape [10] per image but model.json lists 12 labels" in refused(store)


def test_a_model_that_applies_softmax_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, digits_spec(architecture="test_softmax_cnn"))
    assert "outputs already sum to 1" in refused(store)


def test_a_model_that_applies_log_softmax_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, digits_spec(architecture="test_log_softmax_cnn"))
    assert "log-probabilities" in refused(store)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mean": [0.1, 0.2, 0.3]}, "input.mean has 3 entries but input.channels is 1"),
        ({"std": []}, "input.std has 0 entries but input.channels is 1"),
        ({"std": [0.0]}, "input.std must be positive"),
        ({"mean": [33.3], "std": [78.5]}, "look like 0..255 values"),
        (
            {"channels": 3, "channel_order": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3},
            "input.channels is 3 but the network's first convolution (conv1) takes 1",
        ),
        ({"channel_order": "RGB"}, "input.channel_order is RGB but input.channels is 1"),
        ({"channels": 4, "mean": [0.5] * 4, "std": [0.5] * 4}, "input.channels is 4"),
    ],
)
def test_bad_input_specs(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    store = ModelStore(tmp_path)
    write(store, digits_spec(input=msgspec.structs.replace(digits_spec().input, **change)))
    assert message in refused(store)


def test_imagenet_mean_in_bgr_order_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    spec = digits_spec(
        arguments={"in_channels": 3, "input_size": 32, "num_classes": 10},
        input=InputSpec(
            channels=3, height=32, width=32, mean=[0.406, 0.456, 0.485], std=[0.225, 0.224, 0.229]
        ),
    )
    write(store, spec)
    assert "ImageNet's mean in BGR order" in refused(store)


def test_missing_normalization_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)

    def drop_normalization(data: dict[str, Any]) -> None:
        del data["input"]["mean"], data["input"]["std"]

    edit_json(store, 1, drop_normalization)
    assert "missing required field `mean`" in refused(store)


def test_identity_normalization_is_a_warning_on_the_card(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(
        store,
        digits_spec(input=msgspec.structs.replace(digits_spec().input, mean=[0.0], std=[1.0])),
    )
    assert "input is not normalized (mean 0, std 1)" in store.load("m", 1, CPU).warnings[0]


def test_bad_model_json(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    (tmp_path / "m" / "1" / "model.json").write_text("{not json")
    assert refused(store).startswith("model.json: ")


def test_unknown_architecture_and_arguments(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    edit_json(store, 1, lambda d: d.update(architecture="resnet9000"))
    assert "unknown architecture 'resnet9000'; valid: " in refused(store)
    edit_json(store, 1, lambda d: d.update(architecture="small_cnn", arguments={"width": 3}))
    assert "small_cnn takes no argument width" in refused(store)


def test_unknown_heatmap_layer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store, digits_spec(heatmap_layer="conv9"))
    assert "heatmap_layer 'conv9' is not a layer of the network; valid: conv1, conv2" in refused(
        store
    )


def test_receptive_field_smaller_than_the_input_is_a_warning(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    warnings = store.load("m", 1, CPU).warnings
    assert any("sees 10x10 pixels, less than the 28x28 input" in w for w in warnings)


def test_store_ignores_incomplete_and_odd_folders(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    write(store)
    (tmp_path / "m" / "2").mkdir()  # no model.json yet: still being written
    (tmp_path / "m" / "0").mkdir()
    (tmp_path / "m" / "latest").mkdir()
    (tmp_path / "..hidden").mkdir()
    assert store.names() == ["m"]
    assert store.versions("m") == [1]
