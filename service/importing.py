"""`convserve import`: torchvision architectures into the store, with torchvision's own metadata.

Labels and preprocessing come from torchvision's weight metadata (categories and transforms),
which ships inside the package: nothing is downloaded.
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
    torch.manual_seed(seed)
    model = build_model(arch, {"num_classes": len(meta.meta["categories"])}).eval()
    if weights is None:
        metrics = TrainingMetrics(
            dataset=f"random initialisation (seed {seed}): untrained, for benchmarks"
        )
        origin = "random weights"
    else:
        model.load_state_dict(read_state_dict(weights), strict=True)
        top1 = meta.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
        metrics = TrainingMetrics(
            accuracy=None if top1 is None else round(top1 / 100.0, 5),
            dataset=f"ImageNet-1K validation as published for {meta} ({weights.name})",
        )
        origin = f"weights from {weights.name}"
    spec = ModelSpec(
        architecture=arch,
        arguments={"num_classes": len(meta.meta["categories"])},
        input=imagenet_input(meta),
        labels=list(meta.meta["categories"]),
        heatmap_layer=get_architecture(arch).heatmap_layer,
        metrics=metrics,
        sha256="",
        created=now_iso(),
        description=f"{get_architecture(arch).description}, {origin}, via `convserve import`",
    )
    return store.write(name, model, spec)
