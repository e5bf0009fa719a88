"""Fixtures: one real app on the bundled store for the session, driven over HTTP by httpx."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.config import Settings
from tests.support import BUNDLED_STORE


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


async def ready_client(settings: Settings) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    """An httpx client speaking to create_app(settings), returned once every model is ready."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        for _ in range(600):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise TimeoutError("app not ready")
        yield client


@pytest.fixture(scope="session")
async def client(anyio_backend: str) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    async for c in ready_client(Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE)})):
        yield c
