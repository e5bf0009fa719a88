"""What the catalog shows its readers: frozen snapshots of every model's versions, default pin,
aliases and rollout, taken by Catalog.status(). Health, GET /models and management read these,
never the catalog's entries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Serving:
    """What a loaded version runs as."""

    architecture: str
    device: str
    engine: str
    accuracy: float | None
    load_seconds: float
    loaded_at: str


@dataclass(frozen=True)
class VersionState:
    """One version: ready beats loading beats failed when more than one holds."""

    version: int
    state: Literal["ready", "loading", "failed"]
    reason: str | None = None  # why its last load failed: a failed reload leaves it ready
    serving: Serving | None = None  # set when ready


@dataclass(frozen=True)
class Rollout:
    """A candidate version tried on the requests that name no version, beside the stable one.

    canary: a `share` of those requests is answered by the candidate. shadow: the stable version
    answers them all, and the candidate also runs on a `share` of them, unseen by the client,
    so that its agreement and latency show in /metrics (service.shadowing)."""

    mode: Literal["canary", "shadow"]
    candidate: int
    stable: int
    share: float
    started: str


@dataclass(frozen=True)
class ModelState:
    """One model's versions, default pin and aliases."""

    name: str
    serving_version: int | None
    default_version: int | None
    aliases: Mapping[str, int]
    versions: Mapping[int, VersionState]  # by version number
    rollout: Rollout | None = None

    @property
    def loaded(self) -> list[int]:
        """The versions ready to serve, lowest first."""
        return [number for number, v in self.versions.items() if v.state == "ready"]

    @property
    def ready(self) -> bool:
        return bool(self.loaded)


@dataclass(frozen=True)
class CatalogStatus:
    """A snapshot for readers: later changes to the catalog do not show in it."""

    ready: bool
    configured: tuple[str, ...]  # the models readiness waits for, in configured order
    models: Mapping[str, ModelState]  # in the order they were first seen
