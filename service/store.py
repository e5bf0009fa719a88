"""The model store: model_store/<name>/<version>/{model.json, weights.safetensors}.

Loading verifies everything before a model may serve; a broken version is refused with a
reason a user can act on, and never stops other models from loading. The checks that need no
network are here, without torch; service.network builds and checks the network itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from service.errors import ModelLoadError, ModelNotFoundError, VersionNotFoundError
from service.spec import (
    SPEC_FILE,
    InputSpec,
    ModelSpec,
    read_spec,
    sha256_file,
    stored_names,
    stored_versions,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from service.classifier import Classifier

WEIGHTS_FILE = "weights.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)


class ModelStore:
    """A directory of named, versioned models."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return stored_names(self.root)

    def versions(self, name: str) -> list[int]:
        """Complete versions of a model: integer directories holding model.json."""
        return stored_versions(self.root, name)

    def path(self, name: str, version: int) -> Path:
        if version not in self.versions(name):
            raise VersionNotFoundError(f"model {name} has no version {version} in the store")
        return self.root / name / str(version)

    def resolve(self, model: str | None, version: int | None) -> tuple[str, int]:
        """The model (default: the first name in the store) and version (default: the highest)
        a command asks for, or an error that lists what the store holds."""
        names = self.names()
        if not names:
            raise ModelNotFoundError(
                f"the store {self.root} holds no models: give --store, or write one with "
                "`convserve train` or `convserve import`"
            )
        name = model or names[0]
        if name not in names:
            raise ModelNotFoundError(
                f"model {name!r} is not in the store {self.root}; models there: {', '.join(names)}"
            )
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no complete version in {self.root}")
        if version is None:
            return name, versions[-1]
        if version not in versions:
            raise VersionNotFoundError(
                f"model {name!r} has no version {version}; versions: "
                f"{', '.join(map(str, versions))}"
            )
        return name, version

    def load(
        self, name: str, version: int, device: str | torch.device, threads: int | None = None
    ) -> Classifier:
        """Read, verify and dry-run one version; raises ModelLoadError with the reason."""
        from service.network import load_classifier  # torch: only for a full load

        return load_classifier(self.path(name, version), name, version, str(device), threads)

    def write(
        self,
        name: str,
        module: nn.Module | dict[str, torch.Tensor],
        spec: ModelSpec,
        graph: bytes | None = None,
    ) -> int:
        """Write the next version (service.network.write_version)."""
        from service.network import write_version  # torch: only where versions are written

        return write_version(self, name, module, spec, graph)


def check_input(spec: InputSpec) -> list[str]:
    """Refuse input specs that cannot be right; return warnings for doubtful ones."""
    if spec.channels not in (1, 3):
        raise ValueError(
            f"input.channels is {spec.channels}; convserve feeds 1 (grey) or 3 (colour)"
        )
    if spec.height < 1 or spec.width < 1 or (spec.resize_size is not None and spec.resize_size < 1):
        raise ValueError("input.height, input.width and input.resize_size must be positive")
    for key in ("mean", "std"):
        values = getattr(spec, key)
        if len(values) != spec.channels:
            raise ValueError(
                f"input.{key} has {len(values)} entries but input.channels is {spec.channels}: "
                "give one per channel"
            )
    if any(s <= 0 for s in spec.std):
        raise ValueError(f"input.std must be positive, got {spec.std}")
    if any(abs(m) > 1.0 for m in spec.mean) or any(s > 1.0 for s in spec.std):
        raise ValueError(
            f"input.mean {spec.mean} / std {spec.std} look like 0..255 values; convserve scales "
            "pixels to 0..1 before normalizing"
        )
    if (spec.channels == 1) != (spec.channel_order == "L"):
        wanted = "L" if spec.channels == 1 else "RGB or BGR"
        raise ValueError(
            f"input.channel_order is {spec.channel_order} but input.channels is {spec.channels}: "
            f"use {wanted}"
        )
    if spec.channel_order == "RGB" and all(
        abs(a - b) < 1e-3 for a, b in zip(spec.mean, IMAGENET_MEAN[::-1], strict=True)
    ):
        raise ValueError(
            f"input.mean {spec.mean} is ImageNet's mean in BGR order but channel_order is RGB: "
            "swap the order or declare channel_order BGR"
        )
    if all(m == 0 for m in spec.mean) and all(s == 1 for s in spec.std):
        return ["input is not normalized (mean 0, std 1): check this matches training"]
    return []


def read_checked(folder: Path, name: str, version: int) -> tuple[ModelSpec, list[str]]:
    """model.json, checked, and the weights file against its recorded hash; the warnings about
    doubtful input specs. ModelLoadError with the reason otherwise."""
    try:
        spec = read_spec(folder / SPEC_FILE)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelLoadError(name, version, f"{SPEC_FILE}: {exc}") from None
    try:
        warnings = check_input(spec.input)
        if not spec.labels:
            raise ValueError("labels is empty")
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise ValueError(f"{WEIGHTS_FILE} is missing")
        digest = sha256_file(weights)
        if digest != spec.sha256:
            raise ValueError(
                f"{WEIGHTS_FILE} has sha256 {digest[:12]}... but model.json records "
                f"{spec.sha256[:12]}...: the file was changed or corrupted"
            )
    except ValueError as exc:
        raise ModelLoadError(name, version, str(exc)) from None
    return spec, warnings
