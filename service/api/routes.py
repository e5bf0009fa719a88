"""Which routes each kind of process serves. The request routes need only the request path
(no torch: front workers serve them); the model routes need the catalog in the process."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler


def request_routes() -> list[ControllerRouterHandler]:
    """Predictions, V2 inference, the explorer, liveness, metrics, the pages and the files of
    the /schema viewer, and the review page (it reads the capture dir, not the catalog)."""
    from service.api import explorer, health, pages, predict, v2, viewer
    from service.api.review import review

    return [
        predict.predict,
        predict.predict_named,
        explorer.maps,
        health.live,
        health.scrape,
        v2.v2,
        pages.index,
        pages.dashboard,
        pages.assets,
        viewer.asset,
        review,
    ]


def model_routes() -> list[ControllerRouterHandler]:
    """Model list and cards, readiness per model, V2 model metadata, the management API."""
    from service.api import models, readiness
    from service.api.management import management_router
    from service.api.v2_models import v2_models

    return [models.list_models, models.card, models.card_version, readiness.ready, v2_models,
            management_router()]  # fmt: skip
