"""Management API: load, unload and reload versions, pin the default, move aliases.

Off unless CONVSERVE_API_KEY is set; then every call must present the key as
`Authorization: Bearer <key>` or `X-API-Key: <key>` (compared in constant time).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
from typing import Any

import msgspec
from litestar import Router, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody

from service.api.models import model_status
from service.api.openapi import problems
from service.api.runtime_dep import RuntimeDep
from service.api.schemas import ModelStatus
from service.errors import (
    ConflictError,
    ForbiddenError,
    ModelLoadError,
    ModelRefusedError,
    UnauthorizedError,
)
from service.runtime import Runtime
from service.spec import check_name, parse_version

MANAGEMENT_DOCS: dict[str, Any] = {"responses": problems(400, 401, 403, 404, 409, 422, 503)}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="convserve management"'}


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The key as a bearer token, an X-API-Key header, or the password of HTTP Basic (what a
    browser sends for a page behind the key, such as /review; the user name is ignored)."""
    authorization = connection.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme.lower() == "basic" and token.strip():
        with contextlib.suppress(ValueError):
            return base64.b64decode(token.strip(), validate=True).decode().partition(":")[2]
    return connection.headers.get("x-api-key")


def check_api_key(
    connection: ASGIConnection[Any, Any, Any, Any], off: str, challenge: dict[str, str]
) -> None:
    """403 (`off` says why) without CONVSERVE_API_KEY, 401 with `challenge` unless the request
    presents the key. The settings come from the request path, which every process has."""
    expected = connection.app.state.requests.settings.api_key
    if expected is None:
        raise ForbiddenError(off)
    key = presented_key(connection)
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        raise UnauthorizedError(
            "a valid API key is required: send 'Authorization: Bearer <key>' or "
            "'X-API-Key: <key>' (a browser asks for it: any user name, the key as the password)",
            headers=challenge,
        )


def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for every management route."""
    check_api_key(
        connection, "the management API is off; start the server with CONVSERVE_API_KEY", CHALLENGE
    )


class VersionChoice(msgspec.Struct, forbid_unknown_fields=True):
    """Body of the default and alias updates."""

    version: int | None


class StoredVersion(msgspec.Struct):
    version: int
    status: str  # ready | loading | failed | not loaded


class StoredModel(msgspec.Struct):
    name: str
    versions: list[StoredVersion]


class StoreListing(msgspec.Struct):
    root: str
    models: list[StoredModel]


@get(**MANAGEMENT_DOCS, path="/store", summary="Every model version in the store, loaded or not")
async def list_store(runtime: RuntimeDep) -> StoreListing:
    models = runtime.catalog.status().models
    listed = []
    for name in runtime.store.names():
        known = models[name].versions if name in models else {}
        versions = [
            StoredVersion(v, known[v].state if v in known else "not loaded")
            for v in runtime.store.versions(name)
        ]
        listed.append(StoredModel(name, versions))
    return StoreListing(str(runtime.store.root), listed)


def changed(runtime: Runtime, name: str) -> ModelStatus:
    """What every change answers: the model as GET /models now shows it."""
    return model_status(runtime.catalog.status().models[name])


async def _load(runtime: Runtime, name: str, version: int, *, replace: bool) -> ModelStatus:
    runtime.store.path(check_name(name), version)  # 404 unless the store has it
    models = runtime.catalog.status().models
    loaded = name in models and version in models[name].loaded
    if loaded and not replace:
        raise ConflictError(f"model {name} v{version} is already loaded; use .../reload")
    if not loaded and replace:
        raise ConflictError(f"model {name} v{version} is not loaded; use .../load")
    await load_or_refuse(runtime, name, version)
    return changed(runtime, name)


async def load_or_refuse(runtime: Runtime, name: str, version: int) -> None:
    """Load a version; a refusal is a 422 that says why (whatever served before still does)."""
    try:
        await runtime.loader.load(name, version)
    except ModelLoadError as exc:
        raise ModelRefusedError(
            f"model {name} v{version} was refused and nothing changed: {exc.reason}"
        ) from None


@post(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/versions/{version:str}/load",
    summary="Verify, load, warm up, serve",
    status_code=200,
)
async def load_version(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str]
) -> ModelStatus:
    return await _load(runtime, name, parse_version(version), replace=False)


@post(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/versions/{version:str}/reload",
    summary="Reload a version from the store",
    status_code=200,
)
async def reload_version(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str]
) -> ModelStatus:
    return await _load(runtime, name, parse_version(version), replace=True)


@post(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/versions/{version:str}/unload",
    summary="Finish its queue, then free it",
    status_code=200,
)
async def unload_version(
    runtime: RuntimeDep, name: FromPath[str], version: FromPath[str]
) -> ModelStatus:
    await runtime.loader.unload(name, parse_version(version))
    return changed(runtime, name)


@put(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/default",
    summary="Pin the version served when none is named",
)
async def set_default(
    runtime: RuntimeDep, name: FromPath[str], data: JSONBody[VersionChoice]
) -> ModelStatus:
    runtime.catalog.set_default(name, data.version)
    return changed(runtime, name)


@put(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/aliases/{alias:str}",
    summary="Point an alias (stable, canary...) at a version",
)
async def set_alias(
    runtime: RuntimeDep, name: FromPath[str], alias: FromPath[str], data: JSONBody[VersionChoice]
) -> ModelStatus:
    if data.version is None:
        runtime.catalog.delete_alias(name, alias)
    else:
        runtime.catalog.set_alias(name, alias, data.version)
    return changed(runtime, name)


@delete(
    **MANAGEMENT_DOCS,
    path="/models/{name:str}/aliases/{alias:str}",
    summary="Remove an alias",
    status_code=200,
)
async def delete_alias(
    runtime: RuntimeDep, name: FromPath[str], alias: FromPath[str]
) -> ModelStatus:
    runtime.catalog.delete_alias(name, alias)
    return changed(runtime, name)


def management_router() -> Router:
    """Every management route, behind the key (rollouts live in service.api.rollouts)."""
    from service.api import rollouts

    return Router(
        path="/",
        guards=[require_api_key],
        route_handlers=[
            list_store, load_version, reload_version, unload_version, set_default, set_alias,
            delete_alias, rollouts.start_rollout, rollouts.promote, rollouts.rollback,
        ],
        tags=["management"],
        security=[{"apiKey": []}],
    )  # fmt: skip
