"""Training: a smoke run on a slice of MNIST and on an ImageFolder, each loadable afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from service.cli import main
from service.spec import InputSpec
from service.store import ModelStore
from service.training import (
    TrainConfig,
    load_image_folder,
    load_mnist_sample,
    split,
    stratified_sample,
    train_to_store,
)

CPU = torch.device("cpu")


def test_mnist_sample_is_the_bundled_5000_digits() -> None:
    data = load_mnist_sample()
    assert data.images.shape == (5000, 1, 28, 28)
    assert sorted(set(data.targets.tolist())) == list(range(10))
    assert data.images.min() >= 0.0
    assert data.images.max() <= 1.0


def test_split_is_seeded_and_disjoint() -> None:
    train_a, held_a = split(5000, 0.2, seed=0)
    train_b, held_b = split(5000, 0.2, seed=0)
    assert len(held_a) == 1000
    assert len(train_a) == 4000
    assert (held_a == held_b).all()
    assert (train_a == train_b).all()
    assert not set(held_a) & set(train_a)


def test_limit_takes_every_digit_in_proportion() -> None:
    """The MNIST sample is sorted by label: --limit 200 takes 20 of each digit, not 200 zeros,
    and the seeded split of that sample trains on every digit."""
    data = load_mnist_sample()
    chosen = stratified_sample(data.targets, 200, seed=0)
    assert np.bincount(data.targets[chosen]).tolist() == [20] * 10
    assert (chosen == stratified_sample(data.targets, 200, seed=0)).all()
    assert not (chosen == stratified_sample(data.targets, 200, seed=1)).all()
    train_idx, _ = split(len(chosen), 0.2, seed=0)
    assert set(data.targets[chosen][train_idx].tolist()) == set(range(10))
    uneven = np.array([0] * 90 + [1] * 9 + [2])
    assert np.bincount(uneven[stratified_sample(uneven, 10, seed=0)]).tolist() == [8, 1, 1]
    assert np.bincount(uneven[stratified_sample(uneven, 99, seed=0)]).tolist() == [89, 9, 1]


def test_training_smoke_on_a_slice_writes_a_loadable_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    config = TrainConfig(
        "lenet5", {"in_channels": 1, "input_size": [28, 28], "num_classes": 10}, epochs=2, limit=600
    )
    version, metrics = train_to_store(store, "tiny", config, load_mnist_sample(), progress=False)
    assert version == 1
    assert metrics.accuracy is not None
    assert 0.3 < metrics.accuracy <= 1.0
    classifier = store.load("tiny", 1, CPU)
    assert classifier.spec.metrics.samples == 120
    assert classifier.spec.input.mean[0] > 0.05  # normalized with the data's own statistics
    probabilities = classifier.predict([np.zeros((1, 28, 28), np.float32)])
    assert abs(float(probabilities.sum()) - 1.0) < 1e-5


def test_training_is_reproducible(tmp_path: Path) -> None:
    config = TrainConfig(
        "lenet5", {"in_channels": 1, "input_size": 28, "num_classes": 10}, epochs=1, limit=300
    )
    data = load_mnist_sample()
    first = train_to_store(ModelStore(tmp_path / "a"), "m", config, data, progress=False)[1]
    second = train_to_store(ModelStore(tmp_path / "b"), "m", config, data, progress=False)[1]
    assert first.accuracy == second.accuracy


def _shapes_folder(root: Path) -> None:
    """Two classes a CNN separates easily: filled circles and filled squares, in colour."""
    rng = np.random.default_rng(0)
    for kind in ("circle", "square"):
        (root / kind).mkdir(parents=True)
        for index in range(30):
            image = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(0, 80, 3)))
            draw = ImageDraw.Draw(image)
            x, y = (int(v) for v in rng.integers(12, 28, 2))
            r = int(rng.integers(6, 11))
            colour = tuple(int(v) for v in rng.integers(150, 255, 3))
            box = (x - r, y - r, x + r, y + r)
            (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
            image.save(root / kind / f"{index}.png")


def test_image_folder_training_through_the_cli(tmp_path: Path, capsys: object) -> None:
    _shapes_folder(tmp_path / "shapes")
    spec = InputSpec(channels=3, height=32, width=32, mean=[0.0] * 3, std=[1.0] * 3)
    data = load_image_folder(tmp_path / "shapes", spec)
    assert data.images.shape == (60, 3, 32, 32)
    assert data.labels == ["circle", "square"]
    code = main([
        "train", "--arch", "small_cnn", "--name", "shapes", "--data", str(tmp_path / "shapes"),
        "--input", "3x32x32", "--epochs", "3", "--store", str(tmp_path / "store"),
    ])  # fmt: skip
    assert code == 0
    classifier = ModelStore(tmp_path / "store").load("shapes", 1, CPU)
    assert classifier.labels == ["circle", "square"]
    assert classifier.spec.arguments["in_channels"] == 3
