"""The review page (`GET /review`) and its API: label or discard the images capture kept.

Front workers serve it from the capture dir and the dataset dir (service.review), behind the
management API's key. A browser asks for the key itself: the 401 offers HTTP Basic, and the
key is the password (any user name). Grad-CAM for an item runs through the request path like
any prediction, without capturing the image a second time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

import msgspec
from litestar import Response, Router, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import File

from service.api.dependencies import RequestsDep
from service.api.management import check_api_key
from service.api.openapi import problems
from service.api.pages import HEADERS, HTML, STATIC
from service.api.predict import _heatmap
from service.api.schemas import Heatmap, ModelRef, Prediction, top_predictions
from service.capture import extension
from service.errors import (
    CaptureOffError,
    InvalidParameterError,
    ModelNotFoundError,
)
from service.inference import Explain, Image, Requests, Route
from service.review import Captured, Review, check_label, check_sha, media_type
from service.spec import check_name

CHALLENGE = {"WWW-Authenticate": 'Basic realm="convserve review"'}
REVIEW_DOCS: dict[str, Any] = {"responses": problems(400, 401, 403, 404, 422, 503, 504)}
METHOD = "gradcam"


def require_review_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The management API's key; the Basic challenge of a 401 makes a browser ask for it."""
    check_api_key(
        connection,
        "the review page is off; start the server with CONVSERVE_API_KEY (the key is the page's "
        "password)",
        CHALLENGE,
    )


def _review(requests: Requests) -> Review:
    settings = requests.settings
    if settings.capture_dir is None or settings.labelled_dir is None:
        raise CaptureOffError(
            "this server captures no images to review; start the server with CONVSERVE_CAPTURE_DIR"
        )
    return Review(settings.capture_dir, settings.labelled_dir)


class ReviewList(msgspec.Struct):
    """What waits: per model, and the oldest items of one model with every label it has."""

    models: dict[str, int]  # images waiting, per model that has any
    model: str | None  # the model listed (the first one waiting when none was asked for)
    labels: list[str]  # its labels, index order (empty: the model is not served now)
    waiting: int  # images of that model waiting (items holds at most `limit` of them)
    items: list[Captured]


class ReviewHeatmap(msgspec.Struct):
    """What the version looks at in a captured image, and what it says of it now."""

    model: ModelRef
    predictions: list[Prediction]
    heatmap: Heatmap


class Decision(msgspec.Struct, forbid_unknown_fields=True):
    """File the image under one of the model's labels, or throw it away."""

    action: Literal["label", "discard"]
    label: str | None = None


class Reviewed(msgspec.Struct):
    sha256: str
    model: str
    action: str
    label: str | None
    path: str | None  # the PNG written into the dataset


@get("/", summary="The review page", include_in_schema=False)
async def page(requests: RequestsDep) -> File:
    _review(requests)
    return File(STATIC / "review.html", filename="review.html", content_disposition_type="inline",
                media_type=HTML, headers=HEADERS)  # fmt: skip


ModelQuery = Annotated[
    str | None, QueryParameter(description="model (default: the first one with images waiting)")
]
LimitQuery = Annotated[
    int, QueryParameter(ge=1, le=1000, description="most items listed, oldest first")
]


@get("/items", summary="Captured images waiting for review, oldest first", **REVIEW_DOCS)
async def list_items(
    requests: RequestsDep, model: ModelQuery = None, limit: LimitQuery = 100
) -> ReviewList:
    review = _review(requests)
    models = await asyncio.to_thread(review.waiting)
    name = model if model is not None else next(iter(models), None)
    if name is None:
        return ReviewList(models, None, [], 0, [])
    items = await asyncio.to_thread(review.items, check_name(name), limit)
    try:
        labels = (await requests.models.route(name, None)).labels
    except ModelNotFoundError:
        labels = []  # captured by a model no longer served: its images can only be discarded
    return ReviewList(models, name, labels, models.get(name, 0), items)


@get(
    "/items/{model:str}/{sha256:str}/image",
    summary="A captured image, as it was sent",
    media_type="application/octet-stream",
    **REVIEW_DOCS,
)
async def item_image(
    requests: RequestsDep, model: FromPath[str], sha256: FromPath[str]
) -> Response[bytes]:
    _, path = await asyncio.to_thread(_review(requests).item, model, sha256)
    data = await asyncio.to_thread(path.read_bytes)
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600",
               "Content-Security-Policy": "default-src 'none'"}  # fmt: skip
    return Response(data, media_type=media_type(path), headers=headers)


@get(
    "/items/{model:str}/{sha256:str}/heatmap",
    summary="Grad-CAM of a captured image, by the version that captured it if still loaded",
    **REVIEW_DOCS,
)
async def item_heatmap(
    requests: RequestsDep, model: FromPath[str], sha256: FromPath[str]
) -> ReviewHeatmap:
    record, path = await asyncio.to_thread(_review(requests).item, model, sha256)
    data = await asyncio.to_thread(path.read_bytes)
    loaded = {(name, version) for name, version, _ in requests.models.loaded}
    version = str(record.version) if (model, record.version) in loaded else None

    def explain(route: Route) -> Explain:
        return Explain(METHOD, route.heatmap_point(None))

    with requests.admitted():
        first = await requests.models.route(model, version)
        explain(first)  # a version without heatmaps says so before any decode
        deadline = time.monotonic() + requests.settings.deadline_s
        classified = await requests.classify(
            first, model, version, [Image("body", data)], deadline,
            explain=explain, paint=True, check=explain, capture=False,
        )  # fmt: skip
    route, answer = classified.route, classified.answers[0]
    return ReviewHeatmap(
        ModelRef(route.name, route.version),
        top_predictions(answer.probabilities, route.labels, 5),
        _heatmap(METHOD, answer, classified.overlays[0]),
    )


@post(
    "/items/{model:str}/{sha256:str}",
    summary="Label a captured image into the dataset, or discard it",
    status_code=200,
    **REVIEW_DOCS,
)
async def decide(
    requests: RequestsDep, model: FromPath[str], sha256: FromPath[str], data: JSONBody[Decision]
) -> Reviewed:
    review = _review(requests)
    check_name(model)
    check_sha(sha256)
    label = None
    if data.action == "label":
        label = await _known_label(requests, model, data.label)
    with requests.admitted():
        claim = await asyncio.to_thread(review.claim, model, sha256)
        try:
            if label is None:
                await asyncio.to_thread(review.discard, claim)
                return Reviewed(sha256, model, data.action, None, None)
            original = await asyncio.to_thread(claim.image.read_bytes)
            deadline = time.monotonic() + requests.settings.deadline_s
            # a PNG is kept as it came; anything else is decoded under the decoders' ceiling
            png = original if extension(original) == "png" else (
                await requests.decoders.png(original, deadline)
            )  # fmt: skip
            written = await asyncio.to_thread(review.file, claim, label, png)
        except BaseException:
            review.release(claim)  # a rename: the item waits in the list again
            raise
    return Reviewed(sha256, model, data.action, label, str(written))


async def _known_label(requests: Requests, model: str, label: str | None) -> str:
    """One of the serving version's labels, usable as a folder name; 422 naming them otherwise."""
    if not label:
        raise InvalidParameterError(
            'action "label" needs a label: {"action": "label", "label": "7"}'
        )
    labels = (await requests.models.route(model, None)).labels
    if label not in labels:
        shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
        raise InvalidParameterError(
            f"label {label[:80]!r} is not one of model {model}'s labels ({shown})"
        )
    return check_label(label)


review = Router(
    path="/review",
    guards=[require_review_key],
    route_handlers=[page, list_items, item_image, item_heatmap, decide],
    tags=["review"],
    security=[{"apiKey": []}],
)
"""The page and its API, all behind the key."""
