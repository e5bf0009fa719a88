"""POST /models/{name}/layers/{layer}/maps: a conv layer's kernels, bias and maps for one image."""

from __future__ import annotations

import base64
import time
from functools import partial
from typing import Any

import msgspec
import numpy as np
from litestar import Request, post
from litestar.params import FromPath

from service.api.access import annotate
from service.api.classify import prepare_uploads, route_body
from service.api.dependencies import RuntimeDep
from service.api.hangup import unless_hung_up
from service.api.openapi import ImageUploadOperation, problems
from service.api.predict import VersionQuery
from service.api.schemas import ModelRef
from service.api.uploads import Upload, read_uploads
from service.batching import Admission
from service.catalog import Deployment
from service.convolution import Convolution, conv_point, open_convolution
from service.errors import BadRequestError
from service.runtime import Runtime


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


async def _open(
    runtime: Runtime,
    deployment: Deployment,
    admission: Admission,
    uploads: list[Upload],
    layer: str,
    deadline: float,
) -> Convolution:
    """Decode the image, then one pass through the model, admitted on the version's queue."""
    (prepared,) = await prepare_uploads(runtime, deployment, uploads, deadline)
    classifier = deployment.classifier
    work = partial(open_convolution, classifier, prepared.array, layer)
    try:
        return await deployment.batcher.run_alone(admission, work, deadline)
    finally:
        runtime.trimmer.soon()  # the layer's maps: megabytes for a large network, now free


@post(
    "/models/{name:str}/layers/{layer:str}/maps",
    summary="A conv layer's kernels, bias and feature maps for one image",
    description=(
        "Send one image (raw body or one multipart `file` part). The answer holds the layer's "
        "input, kernels and bias and its maps before (`pre`) and after (`post`) the activation, "
        "as base64 float32 arrays, computed by the serving model in one forward pass. "
        "`layer` is a conv layer from the model card's `heatmap_layers`."
    ),
    status_code=200,
    operation_class=ImageUploadOperation,
    responses=problems(400, 404, 408, 413, 415, 422, 500, 503, 504),
)
async def maps(
    request: Request[Any, Any, Any],
    runtime: RuntimeDep,
    name: FromPath[str],
    layer: FromPath[str],
    version: VersionQuery = None,
) -> LayerMaps:
    with runtime.admitted():
        deadline = time.monotonic() + runtime.settings.deadline_s

        def check(deployment: Deployment) -> None:
            classifier = deployment.classifier
            annotate(request, model=classifier.name, version=classifier.version, layer=layer)
            conv_point(classifier, layer)  # 404 naming the conv layers

        deployment, uploads = await route_body(
            runtime,
            name,
            version,
            partial(read_uploads, request, runtime.settings, deadline),
            check,
        )
        if len(uploads) != 1:
            raise BadRequestError(f"send one image to look inside a layer; got {len(uploads)}")
        classifier = deployment.classifier
        # registered with the version's batcher, so retiring the version waits for this work
        with deployment.batcher.incoming(1) as admission:
            conv = await unless_hung_up(
                request, _open(runtime, deployment, admission, uploads, layer, deadline)
            )
        return layer_maps(classifier.name, classifier.version, conv)
