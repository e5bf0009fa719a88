"""Fixtures: one real app on the bundled store for the session, driven over HTTP by httpx."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from litestar import Litestar

from service.app import create_app
from service.config import Settings
from tests.support import BUNDLED_STORE

CACHE_HOME = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Derived files (ONNX exports, engine decisions) of every test and test server go to a
    cache of this run, not the user's ~/.cache/convserve."""
    config.stash[CACHE_HOME] = tempfile.mkdtemp(prefix="convserve-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = config.stash[CACHE_HOME]


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's cache goes with the run: left behind, every run leaked one into /tmp."""
    shutil.rmtree(config.stash.get(CACHE_HOME, ""), ignore_errors=True)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def ready_client(settings: Settings) -> AbstractAsyncContextManager[httpx.AsyncClient]:
    """httpx speaking HTTP to create_app(settings) in this event loop (so requests really run
    concurrently), entered once every model is ready; the app's lifespan runs around it."""
    return app_client(create_app(settings))


@asynccontextmanager
async def app_client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with app.lifespan():
        transport = httpx.ASGITransport(app=cast("Any", app))  # httpx types a narrower ASGI
        async with httpx.AsyncClient(
            transport=transport, base_url="http://convserve.test"
        ) as client:
            for _ in range(600):
                if (await client.get("/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError("app not ready")
            yield client


@pytest.fixture(scope="session")
async def client(anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    async with ready_client(Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE)})) as c:
        yield c
