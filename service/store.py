"""The model store: model_store/<name>/<version>/{model.json, weights.safetensors}.

Loading verifies everything before a model may serve; a broken version is refused with a
reason a user can act on, and never stops other models from loading.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import msgspec
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from service.anatomy import describe, trace
from service.classifier import Classifier
from service.engines import write_onnx
from service.errors import (
    ArchitectureError,
    ModelLoadError,
    VersionNotFoundError,
)
from service.heatmaps import heatmap_layers
from service.registry import build_model
from service.spec import (
    SPEC_FILE,
    InputSpec,
    ModelSpec,
    check_name,
    encode_spec,
    read_spec,
    sha256_file,
    stored_names,
    stored_versions,
)

log = logging.getLogger("convserve.store")
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

    def load(self, name: str, version: int, device: torch.device) -> Classifier:
        """Read, verify and dry-run one version; raises ModelLoadError with the reason."""
        return load_classifier(self.path(name, version), name, version, device)

    def write(self, name: str, module: nn.Module, spec: ModelSpec) -> int:
        """Write the next version atomically: files go in a hidden folder that is renamed last."""
        folder = self.root / check_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
        try:
            weights = staging / WEIGHTS_FILE
            state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(weights))
            spec = msgspec.structs.replace(spec, sha256=sha256_file(weights))
            shape = (spec.input.channels, spec.input.height, spec.input.width)
            try:  # the ONNX Runtime engine's file, exported now so loading need not
                write_onnx(module, shape, staging, spec.sha256)
            except Exception as exc:  # the torch engine serves without it
                log.warning("no ONNX export for %s: %s", name, exc)
            (staging / SPEC_FILE).write_bytes(encode_spec(spec))  # last: marks it complete
            for path in staging.iterdir():
                path.chmod(0o644)
            staging.chmod(0o755)  # mkdtemp makes it private; served stores are read by others
            version = max(self.versions(name), default=0) + 1
            staging.rename(folder / str(version))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version


def _check_input(spec: InputSpec) -> list[str]:
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


def _check_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"wrong shapes {', '.join(wrong[:5])}")
    if problems:
        raise ValueError("weights do not match the architecture: " + "; ".join(problems))


def _first_conv(module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            return name, child
    return None


def _dry_run(module: nn.Module, spec: ModelSpec, device: torch.device) -> None:
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    first = _first_conv(module)
    if first is not None and first[1].in_channels != shape[0]:
        raise ValueError(
            f"input.channels is {shape[0]} but the network's first convolution ({first[0]}) "
            f"takes {first[1].in_channels}"
        )
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, *shape), generator=generator).to(device)
    try:
        with torch.inference_mode():
            logits = module(probe).float()
    except RuntimeError as exc:
        raise ValueError(f"dry run on a {'x'.join(map(str, shape))} input failed: {exc}") from None
    classes = len(spec.labels)
    if tuple(logits.shape) != (2, classes):
        raise ValueError(
            f"dry run gives outputs of shape {list(logits.shape[1:])} per image but model.json "
            f"lists {classes} labels: expected [{classes}] raw logits"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("dry run produced NaN or infinite outputs")
    ones = torch.ones(2, device=logits.device)
    if (logits >= 0).all() and torch.allclose(logits.sum(dim=1), ones, atol=1e-4):
        raise ValueError(
            "outputs already sum to 1: the network applies softmax itself; store it without the "
            "final softmax (convserve applies it once)"
        )
    if torch.allclose(logits.exp().sum(dim=1), ones, atol=1e-4):
        raise ValueError("outputs are log-probabilities (log_softmax); store raw logits")


def load_classifier(folder: Path, name: str, version: int, device: torch.device) -> Classifier:
    """Verify hash, architecture, keys/shapes, labels, input spec and a dry run, then load."""
    try:
        spec = read_spec(folder / SPEC_FILE)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ModelLoadError(name, version, f"{SPEC_FILE}: {exc}") from None
    try:
        warnings = _check_input(spec.input)
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
        module = build_model(spec.architecture, spec.arguments)
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as exc:
            raise ValueError(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
        _check_state(module, state)
        module.load_state_dict(state, strict=True)
        module.eval().requires_grad_(False).to(device)
        _dry_run(module, spec, device)
        shape = (spec.input.channels, spec.input.height, spec.input.width)
        calls = trace(module, torch.zeros((1, *shape), device=device))
        anatomy = describe(module, shape, calls)
        layers = heatmap_layers(calls)
        if spec.heatmap_layer not in layers:
            raise ValueError(
                f"heatmap_layer {spec.heatmap_layer!r} is not a layer of the network; "
                f"valid: {', '.join(layers)}"
            )
    except (ValueError, ArchitectureError) as exc:
        raise ModelLoadError(name, version, str(exc)) from None
    return Classifier(
        name, version, spec, module, device, anatomy, layers, warnings + anatomy.warnings
    )
