"""The explorer's answer: one conv layer applied to one image, as plain arrays (no torch, so a
front worker can describe it in its API schema while the model process computes it)."""

from __future__ import annotations

import base64

import msgspec
import numpy as np

from service.api.schemas import ModelRef


class Tensor(msgspec.Struct):
    """A float32 array: `data` is the base64 of its little-endian bytes in row-major order."""

    shape: list[int]
    data: str
    dtype: str = "float32"


class LayerStep(msgspec.Struct):
    name: str
    type: str


class LayerMaps(msgspec.Struct):
    """One conv layer applied to one image, with everything needed to redo one output value:

    pre[c, y, x] = bias[c] + sum over i, j and the input channels k of group(c) of
    weight[c, k, i, j] * input[k, y * stride - padding + i * dilation, ...] (zeros outside),
    and post is pre after the modules listed in `after` (the ReLU, for the bundled models).
    """

    model: ModelRef
    layer: str
    type: str
    in_channels: int
    out_channels: int
    kernel: list[int]
    stride: list[int]
    padding: list[int]  # leading zeros per side (rows, columns); "same" is resolved
    dilation: list[int]
    groups: int
    padding_mode: str
    after: list[LayerStep]
    input: Tensor  # (C_in, H, W): what the layer received; the preprocessed image for conv1
    weight: Tensor  # (C_out, C_in / groups, kh, kw)
    bias: Tensor | None  # (C_out,)
    pre: Tensor  # (C_out, h, w): the convolution's output
    post: Tensor  # (C_out, h, w): the layer's rectified output, as heatmaps read it


def tensor(array: np.ndarray) -> Tensor:
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return Tensor(list(array.shape), base64.b64encode(data).decode("ascii"))
