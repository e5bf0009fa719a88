"""POST /models/{name}/layers/{layer}/maps: a conv layer's kernels, bias and maps for one image."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from litestar import MediaType, Request, Response, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath

from service.api.access import annotate
from service.api.dependencies import RequestsDep
from service.api.hangup import unless_hung_up
from service.api.openapi import ImageUploadOperation, problems
from service.api.predict import ImageQuery, KeepQuery, VersionQuery
from service.api.uploads import kept_header, read_images, small_body
from service.errors import BadRequestError
from service.inference import Route
from service.layermaps import LayerMaps


@post(
    "/models/{name:str}/layers/{layer:str}/maps",
    summary="A conv layer's kernels, bias and feature maps for one image",
    description=(
        "Send one image (raw body or one multipart `file` part), or name a kept one with "
        "`image=<id>`. The answer holds the layer's "
        "input, kernels and bias and its maps before (`pre`) and after (`post`) the activation, "
        "as base64 float32 arrays, computed by the serving model in one forward pass. "
        "`layer` is a conv layer from the model card's `heatmap_layers`."
    ),
    status_code=200,
    operation_class=ImageUploadOperation,
    responses={
        200: ResponseSpec(LayerMaps, description="the layer laid open"),
        **problems(400, 404, 408, 413, 415, 422, 500, 503, 504),
    },
)
async def maps(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    name: FromPath[str],
    layer: FromPath[str],
    version: VersionQuery = None,
    image: ImageQuery = None,
    keep: KeepQuery = False,
) -> Response[bytes]:
    with requests.admitted():
        deadline = time.monotonic() + requests.settings.deadline_s

        def check(route: Route) -> None:
            annotate(request, model=route.name, version=route.version, layer=layer)
            route.conv_layer(layer)  # 404 naming the conv layers

        read = partial(read_images, request, requests, deadline, image, keep)
        first, sent = await requests.receive(name, version, read, check, small=small_body(request))
        if len(sent.uploads) != 1:
            raise BadRequestError(f"send one image to look inside a layer; got {len(sent.uploads)}")
        opened = requests.open_layer(first, name, version, sent.uploads[0], layer, deadline, check)
        _, body = await unless_hung_up(request, opened)
        return Response(body, media_type=MediaType.JSON, headers=kept_header(sent))
