"""Architectures by name: the seed SmallCNN, LeNet-5 and torchvision classifiers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.card import conv_output_size
from service.errors import ArchitectureError, InputMismatchError

Shape = tuple[int, int, int]  # (channels, height, width)
DEFAULT_INPUT: Shape = (3, 32, 32)  # our own architectures' default: the seed SmallCNN's
DEFAULT_CLASSES = 10


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ArchitectureError(f"input_size must be an int or [height, width], got {value!r}")
    return int(value[0]), int(value[1])


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArchitectureError(f"{name} must be a positive integer, got {value!r}")


def _feature_size(
    in_channels: int,
    input_size: int | tuple[int, int] | list[int],
    num_classes: int,
    stages: list[tuple[str, int, int, int]],
) -> tuple[int, int]:
    """Check the arguments, then walk (layer, kernel, stride, padding) stages to the size the
    fully connected part sees; refuse inputs that collapse to zero on the way."""
    _check_positive("in_channels", in_channels)
    _check_positive("num_classes", num_classes)
    size = _pair(input_size)
    h, w = size
    for layer, kernel, stride, padding in stages:
        h = conv_output_size(h, kernel, stride, padding)
        w = conv_output_size(w, kernel, stride, padding)
        if h < 1 or w < 1:
            raise InputMismatchError(
                f"input {size[0]}x{size[1]} is too small: the output of {layer} collapses to "
                f"{max(h, 0)}x{max(w, 0)}",
                None,
            )
    return h, w


class SmallCNN(nn.Module):
    """The seed network: two conv/ReLU/maxpool stages and two fully connected layers."""

    def __init__(
        self,
        in_channels: int = 3,
        input_size: int | tuple[int, int] | list[int] = 32,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        stages = [("conv1", 3, 1, 1), ("pool1", 2, 2, 0), ("conv2", 3, 1, 1), ("pool2", 2, 2, 0)]
        h, w = _feature_size(in_channels, input_size, num_classes, stages)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * h * w, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        logits: torch.Tensor = self.fc2(self.relu3(self.fc1(self.flatten(x))))
        return logits  # (N, classes) raw logits


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling; conv1 pads 28x28 inputs to 32x32."""

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int | tuple[int, int] | list[int] = 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        stages = [("conv1", 5, 1, 2), ("pool1", 2, 2, 0), ("conv2", 5, 1, 0), ("pool2", 2, 2, 0)]
        h, w = _feature_size(in_channels, input_size, num_classes, stages)
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        logits: torch.Tensor = self.fc3(self.relu4(self.fc2(x)))
        return logits  # (N, classes) raw logits


@dataclass(frozen=True)
class Architecture:
    """A buildable network: its constructor and the layer Grad-CAM reads by default."""

    name: str
    build: Callable[..., nn.Module]
    heatmap_layer: str
    description: str
    torchvision: bool = False

    def arguments(self) -> list[str]:
        return [p for p in inspect.signature(self.build).parameters if p != "weights"]

    def fitted_arguments(self, input_shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
        """The arguments for a CxHxW input and a class count that this constructor takes:
        ours size themselves to the input, torchvision's take only the class count."""
        channels, height, width = input_shape
        wanted = {"num_classes": classes, "in_channels": channels, "input_size": [height, width]}
        return {key: value for key, value in wanted.items() if key in self.arguments()}


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000) -> nn.Module:
        _check_positive("num_classes", num_classes)
        try:
            import torchvision  # imported lazily: it costs a second of start-up
        except ImportError:
            raise ArchitectureError(
                f"{name} needs torchvision: pip install 'convserve[torchvision]'"
            ) from None
        model: nn.Module = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        return model

    build.__name__ = name
    return build


_TORCHVISION = {
    "resnet18": ("layer4", "ResNet-18 (He et al. 2015)"),
    "resnet34": ("layer4", "ResNet-34"),
    "resnet50": ("layer4", "ResNet-50"),
    "mobilenet_v3_small": ("features.12", "MobileNetV3-Small (Howard et al. 2019)"),
    "mobilenet_v3_large": ("features.16", "MobileNetV3-Large"),
    "vgg11": ("features.18", "VGG-11 (Simonyan & Zisserman 2014)"),
    "vgg16": ("features.28", "VGG-16"),
    "efficientnet_b0": ("features.8", "EfficientNet-B0 (Tan & Le 2019)"),
    "alexnet": ("features.10", "AlexNet"),
    "squeezenet1_1": ("features.12", "SqueezeNet 1.1"),
    "densenet121": ("features", "DenseNet-121"),
    "shufflenet_v2_x1_0": ("conv5", "ShuffleNetV2 x1.0"),
    "regnet_y_400mf": ("trunk_output", "RegNetY-400MF"),
}

ARCHITECTURES: dict[str, Architecture] = {
    "small_cnn": Architecture("small_cnn", SmallCNN, "conv2", "the seed SmallCNN"),
    "lenet5": Architecture("lenet5", LeNet5, "conv2", "LeNet-5"),
    **{
        name: Architecture(name, _torchvision_builder(name), layer, text, torchvision=True)
        for name, (layer, text) in _TORCHVISION.items()
    },
}


def register_architecture(arch: Architecture) -> None:
    """Add a custom architecture (Python plug-in); names already taken are refused."""
    if arch.name in ARCHITECTURES:
        raise ArchitectureError(f"architecture {arch.name!r} is already registered")
    ARCHITECTURES[arch.name] = arch


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        valid = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(f"unknown architecture {name!r}; valid: {valid}") from None


def build_model(name: str, arguments: dict[str, Any] | None = None) -> nn.Module:
    """Build an untrained network; bad names or arguments raise errors listing the valid ones."""
    arch = get_architecture(name)
    arguments = dict(arguments or {})
    valid = arch.arguments()
    unknown = sorted(set(arguments) - set(valid))
    if unknown:
        raise ArchitectureError(
            f"{name} takes no argument {', '.join(unknown)}; valid arguments: {', '.join(valid)}"
        )
    try:
        return arch.build(**arguments)
    except ArchitectureError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ArchitectureError(
            f"{name}: cannot build with {arguments}: {exc}; valid arguments: {', '.join(valid)}"
        ) from exc


def torchvision_weights(name: str) -> Any:
    """The DEFAULT weights entry of a torchvision architecture (metadata only, no download)."""
    if not get_architecture(name).torchvision:
        raise ArchitectureError(f"{name} is not a torchvision architecture; use `convserve train`")
    try:
        import torchvision
    except ImportError:
        raise ArchitectureError(
            f"{name} needs torchvision: pip install 'convserve[torchvision]'"
        ) from None
    return torchvision.models.get_model_weights(name).DEFAULT


def default_shape(name: str) -> tuple[Shape, int]:
    """An architecture's default input and class count, one answer for describe, import and
    train: torchvision's from their weight metadata (the crop and categories that import
    writes), ours the seed's 3x32x32 and 10 classes."""
    if not get_architecture(name).torchvision:
        return DEFAULT_INPUT, DEFAULT_CLASSES
    weights = torchvision_weights(name)
    crop = int(weights.transforms().crop_size[0])
    return (3, crop, crop), len(weights.meta["categories"])


def _shown(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _build_checked(arch: Architecture, shape: Shape, classes: int) -> nn.Module:
    """Build for `shape` and run one zero image through; InputMismatchError says why not."""
    try:
        model = build_model(arch.name, arch.fitted_arguments(shape, classes)).eval()
    except InputMismatchError as exc:  # ours refuse an input that collapses as they are built
        raise InputMismatchError(f"{arch.name} cannot take {_shown(shape)}: {exc}", None) from None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != shape[0]:
        raise InputMismatchError(
            f"{arch.name} takes {first.in_channels}-channel input, not {_shown(shape)}", None
        )
    try:
        with torch.no_grad():
            logits = model(torch.zeros((1, *shape)))
    except RuntimeError as exc:  # torch's words for it: too small, wrong size for a layer...
        reason = str(exc).strip().splitlines()[0]
        message = f"{arch.name} cannot take {_shown(shape)}: {reason}"
        raise InputMismatchError(message, None) from None
    if tuple(logits.shape) != (1, classes):
        raise InputMismatchError(
            f"{arch.name} on {_shown(shape)} gives outputs of shape {list(logits.shape)[1:]}, "
            f"not [{classes}]",
            None,
        )
    return model


def fit_model(name: str, input_shape: Shape, classes: int) -> nn.Module:
    """Build `name` for a CxHxW input and a class count, proven by one forward pass, so that an
    input it cannot take is refused before any work, not halfway through training or tracing;
    the error's `fits` is the nearest input it does take (other channels, its default size)."""
    arch = get_architecture(name)
    try:
        return _build_checked(arch, input_shape, classes)
    except InputMismatchError as exc:
        failure = str(exc)
    channels, height, width = input_shape
    other = 4 - channels if channels in (1, 3) else 3  # convserve feeds grey or colour
    default = default_shape(name)[0]
    candidates = [(other, height, width), (channels, *default[1:]), (other, *default[1:]), default]
    for candidate in dict.fromkeys(c for c in candidates if c != input_shape):
        try:
            _build_checked(arch, candidate, classes)
        except InputMismatchError:
            continue
        raise InputMismatchError(failure, candidate)
    raise InputMismatchError(failure, None)
