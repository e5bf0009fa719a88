"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from service import metrics
from service.api.dependencies import RuntimeDep
from service.api.openapi import problems
from service.api.schemas import Health
from service.errors import ModelNotReadyError, ShuttingDownError


@get("/health/live", summary="The process is up")
async def live() -> Health:
    return Health("live")


@get(
    "/health/ready",
    summary="Every configured model has a ready version (503 otherwise)",
    responses=problems(503),
)
async def ready(runtime: RuntimeDep) -> Health:
    catalog = runtime.catalog
    models = {
        name: bool(catalog.models.get(name) and catalog.models[name].deployments)
        for name in catalog.configured
    }
    if runtime.draining:
        raise ShuttingDownError("shutting down: finishing admitted requests", retry_after=1)
    if not runtime.catalog.ready:
        waiting = [name for name, ok in models.items() if not ok] or ["the store scan"]
        raise ModelNotReadyError(f"not ready: waiting for {', '.join(waiting)}", retry_after=1)
    return Health("ready", models)


@get(
    "/metrics",
    summary="Prometheus metrics (OpenMetrics when asked for)",
    media_type="text/plain",
)
async def scrape(request: Request[Any, Any, Any], runtime: RuntimeDep) -> Response[bytes]:
    if runtime.device.type == "cuda":
        import torch

        metrics.DEVICE_MEMORY.labels(str(runtime.device)).set(
            torch.cuda.memory_allocated(runtime.device)
        )
    body, content_type = metrics.render(request.headers.get("accept", ""))
    # Litestar adds the charset itself
    return Response(body, media_type=content_type.replace("; charset=utf-8", ""))
