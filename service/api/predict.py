"""POST /predict and /models/{name}/predict: images in, probabilities (and heatmaps) out."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from litestar import Request, Response, post
from litestar.params import FromPath, QueryParameter

from service import metrics
from service.api.access import annotate
from service.api.schemas import Heatmap, ModelRef, Prediction, PredictResponse, Result
from service.api.uploads import Upload, read_uploads
from service.batching import Outcome
from service.catalog import Deployment
from service.errors import (
    DeadlineExceededError,
    InvalidParameterError,
    NotAcceptableError,
    ServiceError,
)
from service.heatmaps import overlay_png
from service.imaging import PreparedImage, prepare_image
from service.runtime import Runtime, RuntimeDep

Method = Literal["gradcam", "activation"]
PNG = "image/png"
JSON = "application/json"
T = TypeVar("T")

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


def _prepare(
    runtime: Runtime, deployment: Deployment, upload: Upload, heatmap: bool
) -> PreparedImage:
    """Decode + preprocess one image (runs in the decode thread pool)."""
    started = time.perf_counter()
    spec = deployment.classifier.spec.input
    try:
        prepared = prepare_image(
            upload.data, spec, runtime.settings.max_pixels, keep_display=heatmap
        )
    except ServiceError as exc:
        exc.detail = f"{upload.label}: {exc.detail}" if upload.label != "body" else exc.detail
        raise
    labels = (deployment.classifier.name, str(deployment.version))
    metrics.PREPROCESS.labels(*labels).observe(time.perf_counter() - started)
    return prepared


def _heatmap(method: str, outcome: Outcome, prepared: PreparedImage) -> Heatmap:
    """Grid and overlay PNG for one image (runs in the decode thread pool)."""
    assert outcome.grid is not None
    assert outcome.point is not None
    assert outcome.target is not None
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


async def _gather_first_error(awaitables: list[asyncio.Future[T]]) -> list[T]:
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]


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
    started = time.monotonic()
    deadline = started + runtime.settings.deadline_s
    deployment = runtime.catalog.resolve(name, version)
    classifier = deployment.classifier
    annotate(request, model=classifier.name, version=classifier.version)
    if heatmap is None and (layer is not None or target is not None):
        raise InvalidParameterError(
            "`layer` and `target` apply only with heatmap=gradcam|activation"
        )
    if heatmap is not None:
        classifier.read_point(layer)  # 404 naming the valid layers, before any work
    if target is not None and target >= len(classifier.labels):
        raise InvalidParameterError(
            f"target {target} is out of range: model {classifier.name} has "
            f"{len(classifier.labels)} classes (0..{len(classifier.labels) - 1})"
        )
    wants_png = request.accept.best_match([JSON, PNG], default=JSON) == PNG
    if wants_png:
        classifier.read_point(layer)
    uploads = await read_uploads(request, runtime.settings)
    if wants_png:
        if len(uploads) != 1:
            raise NotAcceptableError(
                "Accept: image/png returns one heatmap picture, but "
                f"{len(uploads)} images were sent"
            )
        heatmap = heatmap or "gradcam"
    loop = asyncio.get_running_loop()
    batcher = deployment.batcher
    with batcher.incoming(len(uploads)):
        decoding = [
            loop.run_in_executor(
                runtime.decoders, _prepare, runtime, deployment, upload, heatmap is not None
            )
            for upload in uploads
        ]
        prepared = await _gather_first_error(decoding)
        task = None if heatmap is None else (heatmap, layer or classifier.spec.heatmap_layer)
        futures = batcher.submit([p.array for p in prepared], deadline, task, target)
    try:
        outcomes = await asyncio.wait_for(
            _gather_first_error(futures), timeout=max(deadline - time.monotonic(), 0.0)
        )
    except TimeoutError:
        for future in futures:
            future.cancel()
        raise DeadlineExceededError(
            f"no answer within the {runtime.settings.deadline_ms:.0f} ms deadline"
        ) from None
    annotate(request, batch_size=max(o.batch_size for o in outcomes))
    if heatmap is not None:
        maps = [
            loop.run_in_executor(runtime.decoders, _heatmap, heatmap, outcome, image)
            for outcome, image in zip(outcomes, prepared, strict=True)
        ]
        heatmaps: list[Heatmap | None] = [*await _gather_first_error(maps)]
        if wants_png:
            assert heatmaps[0] is not None
            return Response(base64.b64decode(heatmaps[0].png), media_type=PNG)
    else:
        heatmaps = [None] * len(outcomes)
    results = [
        Result(top_predictions(o.probabilities, classifier.labels, top_k), h)
        for o, h in zip(outcomes, heatmaps, strict=True)
    ]
    body = PredictResponse(ModelRef(classifier.name, classifier.version), results)
    return Response(body)


@post("/predict", summary="Classify images with the default (or `model`) model", status_code=200)
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


@post("/models/{name:str}/predict", summary="Classify images with the named model", status_code=200)
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
