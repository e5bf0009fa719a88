"""Liveness and the Prometheus scrape endpoint: answered by whichever process took the request."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from service import metrics
from service.api.schemas import Health


@get("/health/live", summary="The process is up")
async def live() -> Health:
    return Health("live")


@get(
    "/metrics",
    summary="Prometheus metrics (OpenMetrics when asked for)",
    media_type="text/plain",
)
async def scrape(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = metrics.render(request.headers.get("accept", ""))
    # Litestar adds the charset itself
    return Response(body, media_type=content_type.replace("; charset=utf-8", ""))
