"""create_app(settings) -> Litestar: the whole service in one process (CONVSERVE_WORKERS=0, the
tests, embedding). Its request path reaches the catalog directly, through service.local."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from service.api.framework import build_app
from service.api.routes import model_routes, request_routes
from service.config import Settings
from service.inference import Requests
from service.local import LocalModels
from service.runtime import Runtime


def create_app(settings: Settings, *, start_when_loaded: bool = False) -> Litestar:
    """Build the app; models load in the background after start-up so liveness answers at once.

    `start_when_loaded` finishes start-up only once the models are loaded.
    """
    runtime = Runtime(settings)
    models = LocalModels(runtime.catalog, settings)
    requests = Requests(settings, models)
    runtime.catalog.on_change.append(requests.models_changed)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        await requests.start()
        if start_when_loaded:
            await runtime.loaded()
        try:
            yield
        finally:
            requests.stop()
            await models.stop()
            await runtime.stop()

    return build_app(
        settings,
        request_routes() + model_routes(),
        {"runtime": runtime, "requests": requests},
        lifespan,
        draining=lambda: requests.draining,
        resolve=models.route,
    )
