"""POST /predict and /models/{name}/predict: images in, probabilities (and heatmaps) out."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

from litestar import Request, Response, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter

from service.api.access import annotate, annotate_answer
from service.api.dependencies import RequestsDep
from service.api.hangup import unless_hung_up
from service.api.openapi import ImageUploadOperation, problems
from service.api.schemas import Heatmap, ModelRef, PredictResponse, Result, top_predictions
from service.api.uploads import Upload, kept_header, read_images, small_body
from service.errors import InvalidParameterError, NotAcceptableError
from service.inference import Answer, Classified, Explain, Requests, Route

Method = Literal["gradcam", "activation"]
PNG = "image/png"
JSON = "application/json"

ModelQuery = Annotated[
    str | None, QueryParameter(description="model name (default: the default model)")
]
VersionQuery = Annotated[
    str | None, QueryParameter(description="version number or alias (default: the serving version)")
]
TopK = Annotated[
    int, QueryParameter(ge=1, description="classes to return; clipped to the class count")
]
HeatmapQuery = Annotated[
    Method | None, QueryParameter(description="heatmap to return with each result")
]
LayerQuery = Annotated[str | None, QueryParameter(description="heatmap layer (see the model card)")]
ImageQuery = Annotated[
    str | None,
    QueryParameter(
        description="a kept image's id (the Image-Id header of a request with keep=true), "
        "sent instead of the image: no body"
    ),
]
KeepQuery = Annotated[
    bool,
    QueryParameter(
        description="hold the one image sent, so later requests name it with image=<id> "
        "(its id comes back in the Image-Id header)"
    ),
]
TargetQuery = Annotated[
    int | None,
    QueryParameter(ge=0, description="class index Grad-CAM explains (default: top class)"),
]


def _heatmap(method: str, answer: Answer, overlay: bytes | None) -> Heatmap:
    """One image's heatmap: its grid, and the PNG drawn over the picture."""
    explained = answer.explained
    assert explained is not None
    assert overlay is not None
    height, width = explained.grid.shape
    return Heatmap(
        method=method,
        layer=explained.layer,
        class_index=explained.target,
        width=width,
        height=height,
        grid=explained.grid.tolist(),
        png=base64.b64encode(overlay).decode("ascii"),
    )


def _checker(
    request: Request[Any, Any, Any], method: str | None, layer: str | None, target: int | None
) -> Callable[[Route], None]:
    """404 for an unknown layer, 422 for a class index the model does not have. The version is
    noted first, so a refusal from here on counts under its model's name."""

    def check(route: Route) -> None:
        annotate(request, model=route.name, version=route.version)
        if method is not None:
            route.heatmap_point(layer)
        route.check_target(target)

    return check


async def _answer(
    request: Request[Any, Any, Any],
    requests: Requests,
    first: Route | None,
    name: str | None,
    version: str | None,
    uploads: list[Upload],
    deadline: float,
    method: str | None,
    layer: str | None,
    target: int | None,
) -> Classified:
    """Classify the images and draw their heatmaps: the work a hang-up cancels."""

    def explain(route: Route) -> Explain | None:
        return None if method is None else Explain(method, route.heatmap_point(layer))

    return await requests.classify(
        first, name, version, uploads, deadline, explain=explain, target=target,
        paint=method is not None, check=_checker(request, method, layer, target),
    )  # fmt: skip


@dataclass(frozen=True)
class Ask:
    """The query of a prediction: what to return, and where its image comes from."""

    top_k: int
    heatmap: str | None
    layer: str | None
    target: int | None
    image: str | None
    keep: bool


async def run_prediction(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    name: str | None,
    version: str | None,
    ask: Ask,
) -> Response[object]:
    with requests.admitted():
        return await _predict(request, requests, name, version, ask)


async def _predict(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    name: str | None,
    version: str | None,
    ask: Ask,
) -> Response[object]:
    deadline = time.monotonic() + requests.settings.deadline_s
    wants_png = request.accept.best_match([JSON, PNG], default=JSON) == PNG
    method = ask.heatmap or ("gradcam" if wants_png else None)
    layer, target = ask.layer, ask.target
    if method is None and (layer is not None or target is not None):
        raise InvalidParameterError(
            "`layer` and `target` apply only with heatmap=gradcam|activation"
        )
    first, sent = await requests.receive(
        name, version,
        partial(read_images, request, requests, deadline, ask.image, ask.keep),
        _checker(request, method, layer, target), small=small_body(request),
    )  # fmt: skip
    uploads = sent.uploads
    if wants_png and len(uploads) != 1:
        raise NotAcceptableError(
            f"Accept: image/png returns one heatmap picture, but {len(uploads)} images were sent"
        )
    classified = await unless_hung_up(
        request,
        _answer(request, requests, first, name, version, uploads, deadline, method, layer, target),
    )
    route = classified.route
    annotate_answer(request, classified)
    if wants_png:  # a heatmap was drawn: method defaults to gradcam for image/png
        assert classified.overlays[0] is not None
        return Response(classified.overlays[0], media_type=PNG, headers=kept_header(sent))
    results = [
        Result(
            top_predictions(answer.probabilities, route.labels, ask.top_k),
            None if method is None else _heatmap(method, answer, overlay),
        )
        for answer, overlay in zip(classified.answers, classified.overlays, strict=True)
    ]
    body = PredictResponse(ModelRef(route.name, route.version), results)
    return Response(body, headers=kept_header(sent))


PREDICT_RESPONSES = {
    200: ResponseSpec(PredictResponse, description="probabilities (and heatmaps) per image"),
    **problems(400, 404, 406, 408, 413, 415, 422, 500, 503, 504),
}
PREDICT_DOCS: dict[str, Any] = {
    "status_code": 200,
    "responses": PREDICT_RESPONSES,
    "operation_class": ImageUploadOperation,
    "response_description": "probabilities per image; with Accept: image/png the heatmap picture",
}


@post("/predict", summary="Classify images with the default (or `model`) model", **PREDICT_DOCS)
async def predict(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    model: ModelQuery = None,
    version: VersionQuery = None,
    top_k: TopK = 5,
    heatmap: HeatmapQuery = None,
    layer: LayerQuery = None,
    target: TargetQuery = None,
    image: ImageQuery = None,
    keep: KeepQuery = False,
) -> Response[object]:
    ask = Ask(top_k, heatmap, layer, target, image, keep)
    return await run_prediction(request, requests, model, version, ask)


@post("/models/{name:str}/predict", summary="Classify images with the named model", **PREDICT_DOCS)
async def predict_named(
    request: Request[Any, Any, Any],
    requests: RequestsDep,
    name: FromPath[str],
    version: VersionQuery = None,
    top_k: TopK = 5,
    heatmap: HeatmapQuery = None,
    layer: LayerQuery = None,
    target: TargetQuery = None,
    image: ImageQuery = None,
    keep: KeepQuery = False,
) -> Response[object]:
    ask = Ask(top_k, heatmap, layer, target, image, keep)
    return await run_prediction(request, requests, name, version, ask)
