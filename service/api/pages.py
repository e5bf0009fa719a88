"""The pages people open in a browser: `/` (try a model) and `/dashboard` (live latency).

Plain HTML, CSS and JavaScript from service/static/, no build step; the pages load nothing
from outside the service (the Content-Security-Policy says so to the browser as well).
"""

from __future__ import annotations

from pathlib import Path

from litestar import get
from litestar.response import File
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).resolve().parent.parent / "static"
HTML = "text/html"  # Litestar adds the charset
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
}


def _page(name: str) -> File:
    return File(
        STATIC / name,
        filename=name,
        content_disposition_type="inline",
        media_type=HTML,
        headers=HEADERS,
    )


@get("/", summary="The page to try a model", include_in_schema=False)
async def index() -> File:
    return _page("index.html")


@get("/dashboard", summary="Live latency from the service's own metrics", include_in_schema=False)
async def dashboard() -> File:
    return _page("dashboard.html")


assets = create_static_files_router(
    path="/static", directories=[STATIC], name="static", include_in_schema=False
)
"""Scripts and styles of the pages, served as they are in the package."""
