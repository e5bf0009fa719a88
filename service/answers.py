"""The response cache: answers kept by the sha256 of the image, so an image sent again is
answered without a decode or a forward pass.

One cache per process that serves HTTP (each front worker, or the single process). An entry is
keyed by the image's digest and everything that changes its answer: the model, its version and
the load of it that answered (a reload is a new instance, so it starts with no entries), the
input spec, and the heatmap asked for (method, layer, target class). What only shapes the
response (top_k, JSON or PNG) is applied to the cached answer. The entries of a load that ended
(the version unloaded, reloaded or retired by a swap, or the model process restarted) are
dropped as soon as this process learns of it. No torch and no litestar here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from service import metrics
from service.lru import Lru

if TYPE_CHECKING:
    from service.inference import Answer, Explain, Route

ENTRY_OVERHEAD = 512  # bytes an entry costs beyond its arrays and picture: key, objects, links
HIT, MISS = "hit", "miss"

Version = tuple[str, int, str]
"""(model, version, instance): one load of a version, as the cache tells them apart."""


def version_of(route: Route) -> Version:
    return (route.name, route.version, route.instance)


def digest(item: bytes | np.ndarray) -> bytes:
    """An image's identity: the sha256 of its encoded bytes, or of a preprocessed array's shape
    and float32 values (a distinct prefix: an array never shares a key with a file)."""
    if isinstance(item, bytes):
        return hashlib.sha256(item).digest()
    array = np.ascontiguousarray(item, dtype=np.float32)
    shape = ",".join(map(str, array.shape)).encode()
    return hashlib.sha256(b"array:" + shape + b":" + array.tobytes()).digest()


@dataclass(frozen=True)
class Key:
    digest: bytes
    version: Version
    input: bytes  # the route's input spec, encoded: preprocessing changes the answer
    explain: Explain | None
    target: int | None


@dataclass(frozen=True)
class Cached:
    """One image's answer as it was sent: probabilities, and the heatmap with its picture."""

    answer: Answer
    overlay: bytes | None  # the heatmap's PNG over the picture, when a heatmap was asked for

    @property
    def nbytes(self) -> int:
        explained = self.answer.explained
        grid = explained.grid.nbytes if explained is not None else 0
        picture = len(self.overlay) if self.overlay is not None else 0
        return self.answer.probabilities.nbytes + grid + picture + ENTRY_OVERHEAD


def _frozen(cached: Cached) -> Cached:
    """Readers share the arrays: make writing to them an error rather than a corrupt cache."""
    cached.answer.probabilities.setflags(write=False)
    if cached.answer.explained is not None:
        cached.answer.explained.grid.setflags(write=False)
    return cached


class AnswerCache:
    """Least recently used, bounded by entries and by bytes (CONVSERVE_CACHE_ENTRIES and
    CONVSERVE_CACHE_MB)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: Lru[Key, Cached] = Lru(max_entries, max_bytes, lambda c: c.nbytes)
        self._live: frozenset[Version] | None = None

    @property
    def enabled(self) -> bool:
        return self._entries.enabled

    def __len__(self) -> int:
        return len(self._entries)

    def keys(
        self,
        route: Route,
        digests: Sequence[bytes],
        explain: Explain | None,
        target: int | None,
    ) -> list[Key]:
        spec = msgspec.msgpack.encode(route.input)
        return [Key(d, version_of(route), spec, explain, target) for d in digests]

    def lookup(self, model: str, keys: Sequence[Key]) -> list[Cached] | None:
        """Every key's entry, or None when any is missing: a request is answered from the cache
        only as a whole. Counted per image, as a hit or a miss."""
        if any(self._entries.peek(key) is None for key in keys):
            metrics.CACHE_LOOKUPS.labels(model, MISS).inc(len(keys))
            return None
        metrics.CACHE_LOOKUPS.labels(model, HIT).inc(len(keys))
        return [entry for entry in map(self._entries.get, keys) if entry is not None]

    def store(self, keys: Sequence[Key], entries: Sequence[Cached]) -> None:
        for key, entry in zip(keys, entries, strict=True):
            self._entries.put(key, _frozen(entry))
        self._publish()

    def retain(self, live: Collection[Version]) -> None:
        """Drop the entries of every version not in `live` (the versions loaded now)."""
        current = frozenset(live)
        if current == self._live:
            return
        self._live = current
        if self._entries.drop(lambda key: key.version not in current):
            self._publish()

    def _publish(self) -> None:
        metrics.CACHE_ENTRIES.set(len(self._entries))
        metrics.CACHE_BYTES.set(self._entries.nbytes)
