"""`convserve import`: an architecture and its weights (or a seeded random init) into the store.

For torchvision architectures, labels and preprocessing come from torchvision's weight metadata
(categories and transforms), which ships inside the package: nothing is downloaded. Our own
architectures (small_cnn, lenet5, plug-ins) are sized to the input shape and class count given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from service.errors import ArchitectureError
from service.registry import build_model, get_architecture
from service.spec import InputSpec, ModelSpec, TrainingMetrics, now_iso
from service.store import ModelStore


def torchvision_weights(arch: str) -> Any:
    """The DEFAULT weights entry of a torchvision architecture (metadata only, no download)."""
    if not get_architecture(arch).torchvision:
        raise ArchitectureError(f"{arch} is not a torchvision architecture; use `convserve train`")
    try:
        import torchvision
    except ImportError:
        raise ArchitectureError(
            "importing needs torchvision: pip install 'convserve[torchvision]'"
        ) from None
    return torchvision.models.get_model_weights(arch).DEFAULT


def imagenet_input(weights: Any) -> InputSpec:
    transform = weights.transforms()
    return InputSpec(
        channels=3,
        height=int(transform.crop_size[0]),
        width=int(transform.crop_size[0]),
        mean=[float(v) for v in transform.mean],
        std=[float(v) for v in transform.std],
        resize="center_crop",
        resize_size=int(transform.resize_size[0]),
        interpolation=transform.interpolation.value,
        channel_order="RGB",
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict: safetensors as is; .pth/.pt through torch's tensors-only loader."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the tensors-only unpickler refuses anything else, loudly
        raise ValueError(f"{path} was refused by torch's tensors-only loader: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def import_torchvision(
    store: ModelStore, arch: str, name: str, *, weights: Path | None, seed: int = 0
) -> int:
    """Write `arch` as the next version of `name`: random init, or converted local weights."""
    meta = torchvision_weights(arch)
    top1 = meta.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    published = TrainingMetrics(
        accuracy=None if top1 is None else round(top1 / 100.0, 5),
        dataset=f"ImageNet-1K validation as published for {meta}",
    )
    labels = list(meta.meta["categories"])
    return _write(
        store, arch, name, {"num_classes": len(labels)}, imagenet_input(meta), labels,
        weights=weights, seed=seed, published=published,
    )  # fmt: skip


def import_own(
    store: ModelStore,
    arch: str,
    name: str,
    *,
    weights: Path | None,
    input_shape: tuple[int, int, int],
    classes: int,
    seed: int = 0,
) -> int:
    """Write one of our own architectures, sized to a CxHxW input and a class count, as the next
    version of `name`; its labels are `class 0`.. and inputs are scaled to about -2..2."""
    architecture = get_architecture(arch)
    if architecture.torchvision:
        raise ArchitectureError(f"{arch} is a torchvision architecture: its shape is its own")
    channels, height, width = input_shape
    spec_input = InputSpec(
        channels=channels,
        height=height,
        width=width,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        channel_order="L" if channels == 1 else "RGB",
    )
    labels = [f"class {index}" for index in range(classes)]
    arguments = architecture.fitted_arguments(input_shape, classes)
    return _write(store, arch, name, arguments, spec_input, labels, weights=weights, seed=seed)


def _write(
    store: ModelStore,
    arch: str,
    name: str,
    arguments: dict[str, Any],
    spec_input: InputSpec,
    labels: list[str],
    *,
    weights: Path | None,
    seed: int,
    published: TrainingMetrics | None = None,
) -> int:
    """Build, fill (seeded random or a local state dict, strictly matched) and store a version."""
    torch.manual_seed(seed)
    model = build_model(arch, arguments).eval()
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
    architecture = get_architecture(arch)
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
