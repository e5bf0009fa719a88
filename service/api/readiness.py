"""GET /health/ready where the catalog is: every configured model has a ready version."""

from __future__ import annotations

from litestar import get

from service.api.dependencies import RequestsDep
from service.api.openapi import problems
from service.api.runtime_dep import RuntimeDep
from service.api.schemas import Health
from service.errors import ModelNotReadyError, ShuttingDownError


@get(
    "/health/ready",
    summary="Every configured model has a ready version (503 otherwise)",
    responses=problems(503),
)
async def ready(runtime: RuntimeDep, requests: RequestsDep) -> Health:
    status = runtime.catalog.status()
    models = {
        name: name in status.models and status.models[name].ready for name in status.configured
    }
    if requests.draining:
        raise ShuttingDownError("shutting down: finishing admitted requests", retry_after=1)
    if not status.ready:
        waiting = [name for name, ok in models.items() if not ok] or ["the store scan"]
        raise ModelNotReadyError(f"not ready: waiting for {', '.join(waiting)}", retry_after=1)
    return Health("ready", models)
