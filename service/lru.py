"""A least-recently-used map bounded by entries and by bytes: the response cache's answers and
the kept images both live in one. Used on one event loop: no locks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, max_entries: int, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = size
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value, its place unchanged."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> bool:
        """Keep `value`, evicting the least recently used beyond the bounds. False when it was
        not kept: larger than the whole budget, it would evict everything."""
        size = self.size(value)
        if not self.enabled or size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self.size(old)
        self._entries[key] = value
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= self.size(evicted)
        return key in self._entries

    def drop(self, stale: Callable[[K], bool]) -> int:
        """Remove every entry whose key is `stale`; how many went."""
        keys = [key for key in self._entries if stale(key)]
        for key in keys:
            self._bytes -= self.size(self._entries.pop(key))
        return len(keys)
