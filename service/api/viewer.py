"""/schema: the OpenAPI document and Swagger UI over it, every byte served by the service itself
(Swagger UI's files come from the swagger-ui-py package), so the viewer works with no network.

Views: `/schema` and `/schema/swagger` (Swagger UI), `/schema/openapi.json`,
`/schema/openapi.yaml`. The viewer's files are a request route: a front worker serves them
itself, while the page, which embeds the document, comes from the model process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from litestar import Response, Router, get
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.params import FromPath
from litestar.response import File

from service.problems import PROBLEM_TYPE, problem_json

ASSETS_PATH = "/schema/assets"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
}
HEADERS = {"Cache-Control": "max-age=3600"}  # 1.5 MB of script, changed only by an upgrade


def _swagger_ui_files() -> Path:
    """swagger-ui-py's static folder, found without importing the package: its __init__ pulls
    jinja2 and yaml for framework adapters we do not use (front workers stay light)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("swagger-ui-py is missing: install convserve with its dependencies")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


SWAGGER_UI = _swagger_ui_files()


@get(f"{ASSETS_PATH}/{{name:str}}", summary="Swagger UI's files", include_in_schema=False)
async def asset(name: FromPath[str]) -> File:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundException(f"no viewer file {name!r}; the viewer is at /schema")
    return File(SWAGGER_UI / name, filename=name, content_disposition_type="inline",
                media_type=media_type, headers=HEADERS)  # fmt: skip


async def _problem_for_html_404(response: Response[object]) -> Response[object]:
    """Litestar answers an unknown /schema/... path with an HTML page of its own; every other
    unknown path gets a problem, and so does this one."""
    if response.status_code != 404 or response.media_type == PROBLEM_TYPE:
        return response
    detail = "no such schema view; the viewer is /schema, the document /schema/openapi.json"
    body = problem_json(404, "Not Found", "not-found", detail)
    return Response(body, status_code=404, media_type=PROBLEM_TYPE)


class _SwaggerUI(SwaggerRenderPlugin):
    def receive_router(self, router: Router) -> None:
        """No oauth2-redirect.html: the API's keys are bearer tokens, there is no OAuth2 flow
        for a pop-up to come back from. Unknown views get a problem, not Litestar's page."""
        router.after_request = _problem_for_html_404


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """Swagger UI at /schema over local files (Litestar's defaults load viewers from CDNs),
    and the document as JSON and YAML."""
    return [
        _SwaggerUI(
            path=["/", "/swagger"],
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon="<link rel='icon' href='data:,'>",  # Litestar's default is on a CDN
        ),
        JsonRenderPlugin(),
        YamlRenderPlugin(),
    ]
