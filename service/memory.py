"""Giving freed memory back to the OS: glibc keeps freed heap pages in the process otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
from concurrent.futures import Executor


def trim_heap() -> None:
    """Return the free pages at the top and inside glibc's heaps to the OS (malloc_trim)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def return_freed_memory() -> None:
    """After an unload: collect the model's cycles, then trim, so its memory leaves the RSS."""
    gc.collect()
    trim_heap()


class Trimmer:
    """Trims the heap once answers that needed much memory (Grad-CAM batches, explorer maps)
    have gone quiet for `quiet_s`: a burst of them left about 300 MB in the resident size of a
    resnet18 server until the process ended (docs/reliability.md)."""

    def __init__(self, executor: Executor | None = None, quiet_s: float = 1.0) -> None:
        self.executor = executor
        self.quiet_s = quiet_s
        self._timer: asyncio.TimerHandle | None = None

    def soon(self) -> None:
        """Call on the event loop after a large answer; the trim runs once things are quiet."""
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.quiet_s, self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        loop.run_in_executor(self.executor, trim_heap)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
