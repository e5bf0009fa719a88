"""POST /predict and /models/{name}/predict: images in, probabilities (and heatmaps) out."""

from __future__ import annotations

import asyncio
import base64
import time
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
from litestar import Request, Response, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter

from service.api.access import annotate
from service.api.classify import classify, route_body
from service.api.dependencies import RuntimeDep
from service.api.hangup import unless_hung_up
from service.api.openapi import ImageUploadOperation, problems
from service.api.schemas import Heatmap, ModelRef, Prediction, PredictResponse, Result
from service.api.uploads import Upload, read_uploads
from service.batching import Outcome, Task, gather_first_error
from service.catalog import Deployment
from service.classifier import Classifier
from service.errors import InvalidParameterError, NotAcceptableError
from service.heatmaps import overlay_png
from service.imaging import PreparedImage
from service.runtime import Runtime

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
TargetQuery = Annotated[
    int | None,
    QueryParameter(ge=0, description="class index Grad-CAM explains (default: top class)"),
]


def top_predictions(probabilities: np.ndarray, labels: list[str], top_k: int) -> list[Prediction]:
    """The k most likely classes, sorted by probability (ties by class index)."""
    k = min(top_k, len(labels))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Prediction(labels[i], int(i), float(probabilities[i])) for i in order]


def _heatmap(method: str, outcome: Outcome, prepared: PreparedImage | None) -> Heatmap:
    """Grid and overlay PNG for one image (runs in the decode thread pool)."""
    assert outcome.grid is not None
    assert outcome.point is not None
    assert outcome.target is not None
    assert prepared is not None
    assert prepared.display is not None
    png = overlay_png(prepared.display, prepared.box, outcome.grid)
    height, width = outcome.grid.shape
    return Heatmap(
        method=method,
        layer=outcome.point.layer,
        class_index=outcome.target,
        width=width,
        height=height,
        grid=outcome.grid.tolist(),
        png=base64.b64encode(png).decode("ascii"),
    )


def _check(
    classifier: Classifier, method: str | None, layer: str | None, target: int | None
) -> None:
    """404 for an unknown layer, 422 for a class index the model does not have."""
    if method is not None:
        classifier.read_point(layer)
    if target is not None and target >= len(classifier.labels):
        raise InvalidParameterError(
            f"target {target} is out of range: model {classifier.name} has "
            f"{len(classifier.labels)} classes (0..{len(classifier.labels) - 1})"
        )


async def _answer(
    runtime: Runtime,
    deployment: Deployment,
    uploads: list[Upload],
    deadline: float,
    method: str | None,
    task: Task,
    target: int | None,
) -> tuple[list[Outcome], list[Heatmap | None]]:
    """Classify the images and draw their heatmaps: the work a hang-up cancels."""
    outcomes, prepared = await classify(
        runtime, deployment, uploads, deadline, task=task, target=target,
        keep_display=method is not None,
    )  # fmt: skip
    if method is None:
        return outcomes, [None] * len(outcomes)
    loop = asyncio.get_running_loop()
    maps = [
        loop.run_in_executor(runtime.painters, _heatmap, method, outcome, image)
        for outcome, image in zip(outcomes, prepared, strict=True)
    ]
    try:
        return outcomes, [*await gather_first_error(maps)]
    finally:
        runtime.trimmer.soon()  # gradients, displays and overlays: much memory, now free


async def run_prediction(
    request: Request[Any, Any, Any],
    runtime: RuntimeDep,
    name: str | None,
    version: str | None,
    top_k: int,
    heatmap: str | None,
    layer: str | None,
    target: int | None,
) -> Response[object]:
    with runtime.admitted():
        return await _predict(request, runtime, name, version, top_k, heatmap, layer, target)


async def _predict(
    request: Request[Any, Any, Any],
    runtime: RuntimeDep,
    name: str | None,
    version: str | None,
    top_k: int,
    heatmap: str | None,
    layer: str | None,
    target: int | None,
) -> Response[object]:
    deadline = time.monotonic() + runtime.settings.deadline_s
    wants_png = request.accept.best_match([JSON, PNG], default=JSON) == PNG
    method = heatmap or ("gradcam" if wants_png else None)
    if method is None and (layer is not None or target is not None):
        raise InvalidParameterError(
            "`layer` and `target` apply only with heatmap=gradcam|activation"
        )
    deployment, uploads = await route_body(
        runtime, name, version,
        partial(read_uploads, request, runtime.settings, deadline),
        lambda d: _check(d.classifier, method, layer, target),
    )  # fmt: skip
    if wants_png and len(uploads) != 1:
        raise NotAcceptableError(
            f"Accept: image/png returns one heatmap picture, but {len(uploads)} images were sent"
        )
    classifier = deployment.classifier
    annotate(request, model=classifier.name, version=classifier.version)
    task = None if method is None else (method, layer or classifier.spec.heatmap_layer)
    outcomes, heatmaps = await unless_hung_up(
        request, _answer(runtime, deployment, uploads, deadline, method, task, target)
    )
    annotate(request, batch_size=max(o.batch_size for o in outcomes))
    if wants_png:  # a heatmap was drawn: method defaults to gradcam for image/png
        assert heatmaps[0] is not None
        return Response(base64.b64decode(heatmaps[0].png), media_type=PNG)
    results = [
        Result(top_predictions(o.probabilities, classifier.labels, top_k), h)
        for o, h in zip(outcomes, heatmaps, strict=True)
    ]
    body = PredictResponse(ModelRef(classifier.name, classifier.version), results)
    return Response(body)


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
    runtime: RuntimeDep,
    model: ModelQuery = None,
    version: VersionQuery = None,
    top_k: TopK = 5,
    heatmap: HeatmapQuery = None,
    layer: LayerQuery = None,
    target: TargetQuery = None,
) -> Response[object]:
    return await run_prediction(request, runtime, model, version, top_k, heatmap, layer, target)


@post("/models/{name:str}/predict", summary="Classify images with the named model", **PREDICT_DOCS)
async def predict_named(
    request: Request[Any, Any, Any],
    runtime: RuntimeDep,
    name: FromPath[str],
    version: VersionQuery = None,
    top_k: TopK = 5,
    heatmap: HeatmapQuery = None,
    layer: LayerQuery = None,
    target: TargetQuery = None,
) -> Response[object]:
    return await run_prediction(request, runtime, name, version, top_k, heatmap, layer, target)
