"""`convserve import`: an architecture and its weights (or a seeded random init) into the store.

For torchvision architectures, labels and preprocessing come from torchvision's weight metadata
(categories and transforms), which ships inside the package: nothing is downloaded. Every
architecture is sized to the input shape and class count given, defaulting to
registry.default_shape (torchvision's metadata, or 3x32x32 and 10 classes for ours).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from service.errors import ArchitectureError, UnreadableFileError
from service.registry import Shape, default_shape, fit_model, get_architecture, torchvision_weights
from service.spec import InputSpec, ModelSpec, TrainingMetrics, now_iso
from service.store import ModelStore


def imagenet_input(weights: Any, shape: Shape | None = None) -> InputSpec:
    """The preprocessing torchvision's weights were trained with; at another size than their
    crop, the same normalization with the picture stretched to that size."""
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    _, height, width = shape or (3, crop, crop)
    native = (height, width) == (crop, crop)
    return InputSpec(
        channels=3,
        height=height,
        width=width,
        mean=[float(v) for v in transform.mean],
        std=[float(v) for v in transform.std],
        resize="center_crop" if native else "stretch",
        resize_size=int(transform.resize_size[0]) if native else None,
        interpolation=transform.interpolation.value,
        channel_order="RGB",
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors as is; .pth/.pt through torch's tensors-only loader."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UnreadableFileError(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the tensors-only unpickler refuses anything else, loudly
        reason = str(exc).strip().splitlines()[0]
        raise UnreadableFileError(
            f"{path} could not be read as a state dict by torch's tensors-only loader: {reason}"
        ) from None
    if not isinstance(state, dict):
        raise UnreadableFileError(f"{path} does not hold a state dict")
    return state


def import_torchvision(
    store: ModelStore,
    arch: str,
    name: str,
    *,
    weights: Path | None,
    seed: int = 0,
    input_shape: Shape | None = None,
    classes: int | None = None,
) -> int:
    """Write `arch` as the next version of `name`: random init, or converted local weights.
    Labels are torchvision's categories unless another class count is asked for."""
    meta = torchvision_weights(arch)
    categories = list(meta.meta["categories"])
    shape, count = default_shape(arch)
    shape, classes = input_shape or shape, classes or count
    labels = categories if classes == count else [f"class {i}" for i in range(classes)]
    top1 = meta.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    published = TrainingMetrics(
        accuracy=None if top1 is None else round(top1 / 100.0, 5),
        dataset=f"ImageNet-1K validation as published for {meta}",
    )
    as_published = (shape, classes) == default_shape(arch)
    return _write(
        store, arch, name, shape, imagenet_input(meta, shape), labels,
        weights=weights, seed=seed, published=published if as_published else None,
    )  # fmt: skip


def import_own(
    store: ModelStore,
    arch: str,
    name: str,
    *,
    weights: Path | None,
    input_shape: Shape | None = None,
    classes: int | None = None,
    seed: int = 0,
) -> int:
    """Write one of our own architectures, sized to a CxHxW input and a class count, as the next
    version of `name`; its labels are `class 0`.. and inputs are scaled to about -2..2."""
    if get_architecture(arch).torchvision:
        raise ArchitectureError(f"{arch} is a torchvision architecture: use import_torchvision")
    shape, count = default_shape(arch)
    channels, height, width = input_shape or shape
    spec_input = InputSpec(
        channels=channels,
        height=height,
        width=width,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        channel_order="L" if channels == 1 else "RGB",
    )
    labels = [f"class {index}" for index in range(classes or count)]
    return _write(
        store, arch, name, (channels, height, width), spec_input, labels, weights=weights, seed=seed
    )


def import_architecture(
    store: ModelStore,
    arch: str,
    name: str,
    *,
    weights: Path | None,
    input_shape: Shape | None = None,
    classes: int | None = None,
    seed: int = 0,
) -> int:
    """`convserve import`: torchvision's architectures with their metadata, ours sized plainly."""
    write = import_torchvision if get_architecture(arch).torchvision else import_own
    return write(
        store, arch, name, weights=weights, input_shape=input_shape, classes=classes, seed=seed
    )


def _write(
    store: ModelStore,
    arch: str,
    name: str,
    shape: Shape,
    spec_input: InputSpec,
    labels: list[str],
    *,
    weights: Path | None,
    seed: int,
    published: TrainingMetrics | None = None,
) -> int:
    """Build (proven on one input of `shape`), fill (seeded random or a local state dict,
    strictly matched) and store a version."""
    torch.manual_seed(seed)
    model = fit_model(arch, shape, len(labels))
    architecture = get_architecture(arch)
    arguments = architecture.fitted_arguments(shape, len(labels))
    if weights is None:
        metrics = TrainingMetrics(
            dataset=f"random initialisation (seed {seed}): untrained, for benchmarks"
        )
        origin = "random weights"
    else:
        try:
            model.load_state_dict(read_state_dict(weights), strict=True)
        except RuntimeError as exc:  # torch lists every missing, unexpected or misshapen tensor
            detail = str(exc).split(":", 1)[-1].strip()
            raise ValueError(f"{weights.name} does not fit {arch} {arguments}: {detail}") from None
        if published is None:
            metrics = TrainingMetrics(dataset=f"{weights.name}: accuracy not measured here")
        else:
            metrics = TrainingMetrics(
                accuracy=published.accuracy, dataset=f"{published.dataset} ({weights.name})"
            )
        origin = f"weights from {weights.name}"
    spec = ModelSpec(
        architecture=arch,
        arguments=arguments,
        input=spec_input,
        labels=labels,
        heatmap_layer=architecture.heatmap_layer,
        metrics=metrics,
        sha256="",
        created=now_iso(),
        description=f"{architecture.description}, {origin}, via `convserve import`",
    )
    return store.write(name, model, spec)
