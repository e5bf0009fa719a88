"""A convolution laid open: one conv layer's kernels, bias, input and maps for one image.

What the page's convolution explainer draws, read from the live network in one forward pass
through hooks (ActivationRecorder), so it always shows what the serving model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np
import torch
from torch import nn

from service.api.schemas import ModelRef
from service.card import ReadPoint
from service.classifier import Classifier
from service.errors import LayerNotFoundError
from service.heatmaps import ActivationRecorder
from service.layermaps import LayerMaps, LayerStep, tensor


@dataclass(frozen=True)
class Convolution:
    """One conv layer applied to one image; arrays are float32 on the CPU."""

    layer: str
    module: nn.Conv2d
    padding: tuple[int, int]  # zeros added before the first row and column ("same" resolved)
    after: list[tuple[str, str]]  # (name, type) of the modules between `pre` and `post`
    received: np.ndarray  # (C_in, H, W): the layer's input; the image itself for the first conv
    weight: np.ndarray  # (C_out, C_in / groups, kh, kw)
    bias: np.ndarray | None  # (C_out,)
    pre: np.ndarray  # (C_out, h, w): the convolution's output
    post: np.ndarray  # (C_out, h, w): at the layer's read point (after its ReLU)


def conv_point(classifier: Classifier, layer: str) -> ReadPoint:
    """The read point of conv layer `layer`; 404 naming the conv layers otherwise."""
    points = classifier.conv_layers
    if layer not in points:
        valid = ", ".join(points) or "none"
        raise LayerNotFoundError(
            f"model {classifier.name} v{classifier.version} has no conv layer {layer!r}; "
            f"conv layers: {valid}"
        )
    return points[layer]


def leading_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Rows and columns of padding before the input, as torch applies them."""
    padding = module.padding
    if padding == "same":  # torch puts the smaller half first
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
    if isinstance(padding, str):  # "valid"
        return (0, 0)
    return (int(padding[0]), int(padding[1]))


def modules_between(classifier: Classifier, point: ReadPoint) -> list[tuple[str, str]]:
    """The leaf calls after the conv up to its read point (e.g. bn1, relu), from the layer table."""
    if point.module_name == point.layer:
        return []
    rows = classifier.anatomy.rows
    names = [row.name for row in rows]
    read = point.module_name if point.call_index == 0 else f"{point.module_name}#{point.call_index}"
    start, end = names.index(point.layer), names.index(read)
    return [(row.name, row.type) for row in rows[start + 1 : end + 1]]


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def open_convolution(classifier: Classifier, array: np.ndarray, layer: str) -> Convolution:
    """Run one (C, H, W) image through the network, keeping what conv layer `layer` saw and made.

    Runs on the inference thread: the hooks sit on the live module only for this forward pass.
    """
    point = conv_point(classifier, layer)
    model = classifier.module
    module = model.get_submodule(layer)
    assert isinstance(module, nn.Conv2d), f"{layer} is a {type(module).__name__}"
    own = ReadPoint(layer, layer, 0, point.shape, "conv")  # the conv's own output
    batch = classifier.network.to_batch([array])  # (1, C, H, W)
    with (
        ActivationRecorder(model, own, track_grad=False, keep_input=True) as conv,
        ActivationRecorder(model, point, track_grad=False) as read,
        torch.inference_mode(),
    ):
        model(batch)
    received = conv.received
    if received is None:
        raise RuntimeError(f"layer {layer} did not run in the forward pass")
    return Convolution(
        layer=layer,
        module=module,
        padding=leading_padding(module),
        after=modules_between(classifier, point),
        received=_numpy(received[0]),
        weight=_numpy(module.weight),
        bias=None if module.bias is None else _numpy(module.bias),
        pre=_numpy(conv.recorded()[0]),
        post=_numpy(read.recorded()[0]),
    )


def layer_maps(name: str, version: int, conv: Convolution) -> LayerMaps:
    module = conv.module
    return LayerMaps(
        model=ModelRef(name, version),
        layer=conv.layer,
        type=type(module).__name__,
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel=list(module.kernel_size),
        stride=list(module.stride),
        padding=list(conv.padding),
        dilation=list(module.dilation),
        groups=module.groups,
        padding_mode=module.padding_mode,
        after=[LayerStep(n, t) for n, t in conv.after],
        input=tensor(conv.received),
        weight=tensor(conv.weight),
        bias=None if conv.bias is None else tensor(conv.bias),
        pre=tensor(conv.pre),
        post=tensor(conv.post),
    )


def layer_maps_json(classifier: Classifier, array: np.ndarray, layer: str) -> bytes:
    """Runs on the inference thread: the pass, and the answer encoded while it is at hand."""
    conv = open_convolution(classifier, array, layer)
    return msgspec.json.encode(layer_maps(classifier.name, classifier.version, conv))
