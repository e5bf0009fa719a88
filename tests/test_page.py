"""The pages over HTTP: served from the package, self-contained (nothing loaded from outside)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from service.api.pages import STATIC

pytestmark = pytest.mark.anyio
ASSET = re.compile(r"""(?:src|href)="(/static/[^"]+)"|from "\./([^"]+)\"""")
URL = re.compile(r"""(?:https?:)?//[a-zA-Z0-9.-]+\.[a-z]{2,}[^\s"'`)]*""")
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name in createElementNS, never fetched


def static_files() -> list[Path]:
    return sorted(p for p in STATIC.rglob("*") if p.is_file())


async def test_index_page_is_served_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert '<script type="module" src="/static/page.js">' in response.text
    assert "<title>convserve: try a model</title>" in response.text


async def test_dashboard_page_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert '<script type="module" src="/static/dashboard.js">' in response.text


async def test_every_referenced_asset_is_served(client: httpx.AsyncClient) -> None:
    """Each script, stylesheet and module import the pages name answers 200 with its type."""
    types = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
    referenced: set[str] = set()
    for path in static_files():
        for absolute, relative in ASSET.findall(path.read_text()):
            referenced.add(absolute or f"/static/{relative}")
    assert {"/static/page.js", "/static/dashboard.js", "/static/style.css"} <= referenced
    assert "/static/explainer.js" in referenced  # imported by page.js
    for url in sorted(referenced):
        response = await client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].startswith(types[Path(url).suffix]), url
    served = {f"/static/{p.relative_to(STATIC)}" for p in static_files()}
    pages = {"/static/index.html", "/static/dashboard.html", "/static/review.html"}
    unused = served - referenced - pages
    assert not unused, f"static files nothing loads: {unused}"


def test_pages_load_nothing_from_outside() -> None:
    """No CDN, font service or analytics: the pages work on a closed network."""
    for path in static_files():
        urls = [u for u in URL.findall(path.read_text()) if u != SVG_NAMESPACE]
        assert not urls, f"{path.name} names outside addresses: {urls}"
        assert "@import" not in path.read_text()


async def test_missing_asset_is_a_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/static/nope.js")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_pages_stay_out_of_the_api_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert "/dashboard" not in paths
    assert not [p for p in paths if p.startswith("/static")]
