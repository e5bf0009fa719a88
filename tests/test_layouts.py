"""Promises at the HTTP edge, against a real `convserve serve` in both process layouts (one
process; two front workers forwarding to a model process): HEAD wherever GET, a known model's
4xx counted under its name, and every page and /schema view working offline in Chromium."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route

from service.app import create_app
from service.config import Settings
from tests.support import (
    ARTIFACTS,
    BUNDLED_STORE,
    ServerProcess,
    exchange,
    running_server,
)
from tests.test_metrics import REFUSED, counted
from tests.test_page_browser import chromium

KEY = "layouts-key"
AUTH = {"authorization": f"Bearer {KEY}"}
# GET routes' path parameters, filled with values the bundled store has
FILL = {"name": "digits", "version": "1", "layer": "conv1", "file_path": "style.css",
        "alias": "stable", "path": "openapi.json", "model": "digits",
        "sha256": "0" * 64}  # fmt: skip
VARYING = {"date", "x-request-id"}  # differ between any two answers
SHOTS = ARTIFACTS / "page"


@pytest.fixture(scope="module", params=["0", "2"], ids=["one-process", "two-workers"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "CONVSERVE_WORKERS": request.param,
        "CONVSERVE_API_KEY": KEY,
        "CONVSERVE_LOG_LEVEL": "warning",
    }
    with running_server(tmp_path_factory.mktemp("layouts"), env) as process:
        yield process


def get_paths() -> list[str]:
    """Every GET route of the app, its path parameters filled in."""
    app = create_app(Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE)}))
    fill = lambda match: FILL[match[1]]  # noqa: E731
    return sorted(
        re.sub(r"\{(\w+):\w+\}", fill, route.path)
        for route in app.routes
        if "GET" in getattr(route, "methods", ())
    )


def comparable(response: httpx.Response) -> dict[str, str]:
    headers = {k: v for k, v in response.headers.items() if k not in VARYING}
    if response.request.url.path == "/metrics":  # the scrape grows with every request
        headers.pop("content-length")
    return headers


def test_head_answers_as_get_without_a_body(server: ServerProcess) -> None:
    paths = get_paths()
    assert {"/health/live", "/health/ready", "/metrics", "/schema", "/store"} <= set(paths)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        for path in paths:
            got, head = client.get(path), client.head(path)
            assert head.status_code == got.status_code, path
            assert comparable(head) == comparable(got), path
            assert head.content == b"", path
        refused = client.head("/predict")
        assert (refused.status_code, refused.content) == (405, b"")
    # on the wire: the head, then nothing (the next bytes would be read as a response)
    for path in ("/health/live", "/health/ready", "/models/digits", "/schema"):
        request = f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        raw = exchange(server.url, request.encode())
        fields, _, rest = raw.partition(b"\r\n\r\n")
        assert fields.startswith(b"HTTP/1.1 200 "), (path, fields)
        assert b"\r\ncontent-length: " in fields.lower(), path
        assert rest == b"", path


def test_a_known_models_4xx_counts_under_its_name(server: ServerProcess) -> None:
    expected = Counter(labels for *_, labels in REFUSED)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = client.get("/metrics").text
        for path, headers, body, labels in REFUSED:
            response = client.post(path, content=body, headers=headers)
            assert response.status_code == int(labels[2]), (path, response.text)
        # counted once the answer is out (in whichever worker took it): poll for it
        deadline = time.monotonic() + 10
        while True:
            after = client.get("/metrics").text
            found = {
                labels: counted(after, labels) - counted(before, labels) for labels in expected
            }
            if found == expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert found == expected


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def html_pages(server: ServerProcess) -> list[str]:
    """What a browser opens: every GET route without parameters that answers HTML."""
    pages = []
    for path in get_paths():
        if path in {"/store"} or "{" in path:
            continue
        if httpx.get(server.url + path, timeout=30).headers["content-type"].startswith("text/html"):
            pages.append(path)
    return pages


RENDERED = {  # what shows each known page has done its work
    "/": "#card-table tbody tr",
    "/dashboard": "#chart-rate svg",
    "/schema": '.opblock-summary-path[data-path="/predict"]',
    "/schema/swagger": '.opblock-summary-path[data-path="/models/{name}/predict"]',
}


def visit(browser: Browser, server: ServerProcess, path: str, shot: Path) -> list[str]:
    """Open one page with only the server reachable (any other host is refused, so a page
    that needed one fails to render); every URL it asked for."""
    host = urlsplit(server.url).netloc
    asked: list[str] = []
    errors: list[str] = []

    def only_here(route: Route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlsplit(url).netloc == host:
            route.continue_()
        else:
            route.abort()

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        context.route("**/*", only_here)
        page: Page = context.new_page()
        page.on("request", lambda r: asked.append(r.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + path)
        if path in RENDERED:
            page.wait_for_selector(RENDERED[path], timeout=20_000)
        page.wait_for_load_state("networkidle")
        if path == "/schema":
            assert page.title() == "convserve"
            assert page.locator(".opblock").count() >= 20  # every operation, not one
            page.screenshot(path=shot)
    finally:
        context.close()
    assert not errors, f"{path}: {errors}"
    return asked


def test_every_page_and_schema_view_works_offline(
    server: ServerProcess, browser: Browser, request: pytest.FixtureRequest
) -> None:
    pages = html_pages(server)
    assert set(RENDERED) <= set(pages), pages
    SHOTS.mkdir(parents=True, exist_ok=True)
    for path in pages:
        shot = SHOTS / f"schema-{request.node.callspec.id}.png"
        asked = visit(browser, server, path, shot)
        outside = [u for u in asked if not u.startswith(("data:", "blob:"))]
        outside = [u for u in outside if urlsplit(u).hostname != "127.0.0.1"]
        assert not outside, f"{path} asked for {outside}"
