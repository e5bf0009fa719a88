"""Stop a request's work when its client hangs up: its decodes and queued images are dropped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from litestar import Request
from litestar.types import Receive

from service.errors import ClientClosedError

T = TypeVar("T")


async def _hung_up(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_hung_up(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first. Call only once the body has
    been read: from then on the only message the server can send is the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_hung_up(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientClosedError("the client closed the connection before its answer was ready")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not task.done():  # this request itself was cancelled
            task.cancel()
