"""Request bodies -> image bytes: raw image bodies and multipart `file` parts, within limits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import multipart
from litestar import Request
from litestar.exceptions import ClientException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from service.config import Settings
from service.errors import (
    BadRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
)
from service.inference import Image, Requests

RAW_TYPES = ("application/octet-stream",)
SMALL_BODY_BYTES = 64 * 1024  # a body that arrives with its head, or nearly: read before routing
CLOSE = {"Connection": "close"}
REFUSED_IMAGE_TYPES = {
    "image/svg+xml": "SVG is a vector format; send a raster image (PNG, JPEG, ...)",
}
ACCEPTED = (
    "image/* or application/octet-stream (one image), or multipart/form-data with `file` parts"
)


Upload = Image  # an image as it arrived: bytes to decode, named for its errors
IMAGE_ID_HEADER = "Image-Id"  # a kept image's id, for `image=` in later requests


def _too_large(settings: Settings) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the request body exceeds the limit of {settings.max_body_bytes:,} bytes",
        headers=CLOSE,  # the rest of the body is never read: the connection cannot be reused
    )


async def _chunks(request: Request[Any, Any, Any], settings: Settings) -> AsyncIterator[bytes]:
    """The body as it arrives; the byte limit is enforced on Content-Length first, then on reads."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except RequestEntityTooLarge:
        raise _too_large(settings) from None
    except InternalServerException:
        raise BadRequestError("the client disconnected before sending the whole body") from None
    except ClientException as exc:
        raise BadRequestError(str(exc.detail)) from None


async def _parse_multipart(
    request: Request[Any, Any, Any], boundary: str, settings: Settings
) -> list[Upload]:
    uploads: list[Upload] = []
    try:
        parser = multipart.PushMultipartParser(boundary, max_segment_count=settings.max_images)
    except multipart.MultipartError as exc:
        raise BadRequestError(f"malformed multipart/form-data: {exc}") from None
    segment: multipart.MultipartSegment | None = None
    parts: list[bytes] = []
    try:
        with parser:
            async for chunk in _chunks(request, settings):
                for event in parser.parse(chunk):
                    if isinstance(event, multipart.MultipartSegment):
                        segment, parts = event, []
                    elif event:
                        parts.append(event)
                    elif segment is not None:
                        if segment.name == "file" or segment.filename:
                            name = f" ({segment.filename})" if segment.filename else ""
                            uploads.append(
                                Upload(f"file {len(uploads) + 1}{name}", b"".join(parts))
                            )
                        segment = None
                if parser.closed:
                    break
    except multipart.ParserLimitReached:
        raise PayloadTooLargeError(
            f"more than {settings.max_images} parts in one request; the limit is "
            f"{settings.max_images} images"
        ) from None
    except multipart.MultipartError as exc:
        raise BadRequestError(
            f"malformed multipart/form-data ({exc}); check the boundary in Content-Type"
        ) from None
    if not uploads:
        raise BadRequestError("the multipart body has no `file` part; send -F file=@image.jpg")
    return uploads


async def read_body(request: Request[Any, Any, Any], settings: Settings, deadline: float) -> bytes:
    """The whole body, within CONVSERVE_MAX_BODY_BYTES (413 before reading when announced)
    and before the request's deadline (408: a client that stalls mid-body holds nothing)."""
    body = bytearray()
    async with _before(deadline):
        async for chunk in _chunks(request, settings):
            body.extend(chunk)
    return bytes(body)


@contextlib.asynccontextmanager
async def _before(deadline: float) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout_at(
            asyncio.get_running_loop().time() + deadline - time.monotonic()
        ):
            yield
    except TimeoutError:
        raise RequestTimeoutError(
            "the request body did not arrive before the deadline", headers=CLOSE
        ) from None


async def read_uploads(
    request: Request[Any, Any, Any], settings: Settings, deadline: float
) -> list[Upload]:
    """Every image in the request, in order; 413/415/400 problems for anything else."""
    header = request.headers.get("content-type", "")
    media_type, options = multipart.parse_options_header(header)
    media_type = media_type.lower()
    if media_type == "multipart/form-data":
        boundary = options.get("boundary")
        if not boundary:
            raise BadRequestError("multipart/form-data without a boundary in Content-Type")
        async with _before(deadline):
            return await _parse_multipart(request, boundary, settings)
    if media_type in REFUSED_IMAGE_TYPES:
        raise UnsupportedMediaTypeError(REFUSED_IMAGE_TYPES[media_type])
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        return [Upload("body", await read_body(request, settings, deadline))]
    shown = media_type or "no Content-Type"
    raise UnsupportedMediaTypeError(f"{shown} is not accepted; send {ACCEPTED}")


@dataclass(frozen=True)
class Sent:
    uploads: list[Upload]
    kept: str | None = None  # the id of the image held for later requests: the Image-Id header


def small_body(request: Request[Any, Any, Any]) -> bool:
    """Whether the body is small enough to have come with the head (a declared length of at
    most SMALL_BODY_BYTES, or none): reading it before routing costs the client nothing, and
    the request's admission then routes it (Requests.receive)."""
    if "transfer-encoding" in request.headers:
        return False
    length = request.headers.get("content-length", "0").strip()
    return length.isdigit() and int(length) <= SMALL_BODY_BYTES


def _has_body(request: Request[Any, Any, Any]) -> bool:
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length not in ("", "0")


async def read_images(
    request: Request[Any, Any, Any],
    requests: Requests,
    deadline: float,
    image: str | None,
    keep: bool,
) -> Sent:
    """The request's images: those of its body, or the kept one it names (`image=<id>`, no
    body). With `keep`, the one image sent is held, so later requests name it instead."""
    if image is not None:
        if _has_body(request):
            raise BadRequestError(
                "send either an image in the body or image=<id> naming a kept one, not both"
            )
        return Sent([await requests.named(image)])
    uploads = await read_uploads(request, requests.settings, deadline)
    if not keep:
        return Sent(uploads)
    if len(uploads) != 1:
        raise BadRequestError(f"keep=true keeps one image; this request sent {len(uploads)}")
    return Sent(uploads, await requests.keep(uploads[0]))


def kept_header(sent: Sent) -> dict[str, str]:
    return {} if sent.kept is None else {IMAGE_ID_HEADER: sent.kept}
