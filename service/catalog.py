"""Catalog: which model versions serve, under which aliases and defaults, and which one a
request's model name and version resolve to.

The loader (service.loading) changes it through a few small methods; readers take a status()
snapshot instead of reading its entries. Every change is one dict assignment on the event loop,
so a request sees either the old state or the new one. No torch here: it only routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal

from service import metrics
from service.catalog_status import CatalogStatus, ModelState, Rollout, Serving, VersionState
from service.errors import (
    ConflictError,
    InvalidParameterError,
    ModelNotFoundError,
    ModelNotReadyError,
    VersionNotFoundError,
)
from service.spec import VERSION_PATTERN, check_name, now_iso

if TYPE_CHECKING:
    from service.batching import Batcher
    from service.classifier import Classifier
    from service.inference import Route

ALIAS_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


@dataclass(eq=False)
class Deployment:
    """One version that is serving: classifier + batcher, and its route for the request path."""

    classifier: Classifier
    batcher: Batcher
    route: Route
    load_seconds: float
    loaded_at: str = field(default_factory=now_iso)

    @property
    def version(self) -> int:
        return self.classifier.version

    def serving(self) -> Serving:
        classifier = self.classifier
        return Serving(
            architecture=classifier.spec.architecture,
            device=classifier.device_type,
            engine=classifier.engine.name,
            accuracy=classifier.spec.metrics.accuracy,
            load_seconds=self.load_seconds,
            loaded_at=self.loaded_at,
        )


@dataclass(eq=False)
class ModelEntry:
    name: str
    deployments: dict[int, Deployment] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    aliases: dict[str, int] = field(default_factory=dict)
    default_version: int | None = None
    rollout: Rollout | None = None

    def serving_version(self) -> int | None:
        """The stable version of a rollout, else the pinned default when it is loaded, else the
        highest loaded version (so a candidate loaded above it does not take over)."""
        if self.rollout is not None and self.rollout.stable in self.deployments:
            return self.rollout.stable
        if self.default_version in self.deployments:
            return self.default_version
        return max(self.deployments, default=None)

    def state(self) -> ModelState:
        versions = {n: VersionState(n, "failed", reason) for n, reason in self.failures.items()}
        for number in self.loading:
            versions[number] = VersionState(number, "loading", self.failures.get(number))
        for number, deployment in self.deployments.items():
            reason = self.failures.get(number)
            versions[number] = VersionState(number, "ready", reason, deployment.serving())
        return ModelState(
            name=self.name,
            serving_version=self.serving_version(),
            default_version=self.default_version,
            aliases=MappingProxyType(dict(self.aliases)),
            versions=MappingProxyType({n: versions[n] for n in sorted(versions)}),
            rollout=self.rollout,
        )


class Catalog:
    """Routes requests to the loaded versions; the loader adds and removes them."""

    def __init__(self, default_model: str | None, store_root: Path) -> None:
        self.default_model = default_model
        self.store_root = store_root  # named when nothing is loaded
        self._models: dict[str, ModelEntry] = {}
        self._configured: list[str] = []
        self._started = False
        # told after a version starts or stops serving (the response cache drops its answers)
        self.on_change: list[Callable[[], None]] = []

    # ---- what readers see ------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Start-up loading has ended (whether or not every model loaded)."""
        return self._started

    @property
    def ready(self) -> bool:
        """Start-up loading has ended and every configured model has a version serving."""
        return self._started and all(
            name in self._models and self._models[name].deployments for name in self._configured
        )

    def status(self) -> CatalogStatus:
        """What GET /models, readiness, management and the watcher read: a copy, so that no
        reader depends on (or changes) the entries."""
        return CatalogStatus(
            ready=self.ready,
            configured=tuple(self._configured),
            models=MappingProxyType({name: e.state() for name, e in self._models.items()}),
        )

    # ---- changes made by the loader --------------------------------------------------------

    def configure(self, names: list[str]) -> None:
        """The models that readiness waits for."""
        self._configured = names

    def add(self, name: str) -> None:
        """A model GET /models lists (and requests reach) even before any version loaded."""
        self._models.setdefault(name, ModelEntry(name))

    @contextmanager
    def loading(self, name: str, version: int) -> Iterator[None]:
        """Marks a version as loading while the block runs; one load per version at a time."""
        self.add(check_name(name))
        entry = self._models[name]
        if version in entry.loading:
            raise ConflictError(f"model {name} v{version} is already loading")
        entry.loading.add(version)
        try:
            yield
        finally:
            entry.loading.discard(version)

    def record_failure(self, name: str, version: int, reason: str) -> None:
        """Shown by GET /models; whatever served before keeps serving."""
        self._models[name].failures[version] = reason

    def install(self, deployment: Deployment) -> Deployment | None:
        """Serve `deployment` from now on; returns the one it replaces, for retiring."""
        entry = self._models[deployment.classifier.name]
        old = entry.deployments.get(deployment.version)
        entry.deployments[deployment.version] = deployment  # the switch
        entry.failures.pop(deployment.version, None)
        self._publish_ready()
        self._changed()
        return old

    def remove(self, name: str, version: int) -> Deployment:
        """Stop routing to a version, with its aliases and default pin; returns it for retiring.

        The last version of a configured model stays: removing it would take the model (and
        readiness) down; load its replacement first."""
        entry = self._entry(name)
        if version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version}")
        if name in self._configured and set(entry.deployments) == {version}:
            raise ConflictError(
                f"v{version} is the only loaded version of {name}; load another version first "
                "(a configured model always keeps one version serving)"
            )
        rollout = entry.rollout
        if rollout is not None and version in (rollout.stable, rollout.candidate):
            raise ConflictError(
                f"v{version} is in {name}'s {rollout.mode} rollout (v{rollout.stable} stable, "
                f"v{rollout.candidate} candidate); promote or roll it back first"
            )
        deployment = entry.deployments.pop(version)
        for alias, target in list(entry.aliases.items()):
            if target == version:
                del entry.aliases[alias]
        if entry.default_version == version:
            entry.default_version = None
        self._publish_ready()
        self._changed()
        return deployment

    def mark_started(self) -> None:
        """Start-up loading has ended: from now on a model without versions is not 'loading'."""
        self._started = True
        self._publish_ready()
        self._changed()

    def shadow(
        self, deployment: Deployment, version: str | int | None, draw: float
    ) -> Deployment | None:
        """The candidate that also runs, unseen, on a request that names no version and is
        answered by the stable one of a shadow rollout (for a `share` of them)."""
        entry = self._models.get(deployment.classifier.name)
        rollout = entry.rollout if entry is not None else None
        if (
            rollout is None
            or rollout.mode != "shadow"
            or version
            or draw >= rollout.share
            or deployment.version != rollout.stable
        ):
            return None
        return entry.deployments.get(rollout.candidate) if entry is not None else None

    def deployments(self) -> list[Deployment]:
        return [d for entry in self._models.values() for d in entry.deployments.values()]

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def _publish_ready(self) -> None:
        metrics.READY.set(1 if self.ready else 0)

    # ---- changes made through the management API -------------------------------------------

    def set_default(self, name: str, version: int | None) -> None:
        """Pin the version served when a request names none (None: the highest loaded)."""
        entry = self._entry(name)
        if version is not None and version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version} to serve")
        entry.default_version = version
        self._changed()

    def set_alias(self, name: str, alias: str, version: int) -> None:
        entry = self._entry(name)
        if not ALIAS_PATTERN.fullmatch(alias):
            raise InvalidParameterError(
                f"alias {alias!r} must start with a letter and use letters, digits, '_' or '-'"
            )
        if version not in entry.deployments:
            raise VersionNotFoundError(f"model {name} has no loaded version {version} to alias")
        entry.aliases[alias] = version
        self._changed()

    def start_rollout(
        self,
        name: str,
        candidate: int,
        mode: Literal["canary", "shadow"],
        share: float,
        stable: int | None = None,
    ) -> Rollout:
        """Try `candidate` beside the version serving now (kept as the stable one). A rollout
        already running for the same candidate changes mode or share and keeps its stable
        version. The candidate may not be loaded yet: until it serves, the stable one answers
        (the caller loads it, and abandons the rollout when that fails). `stable` is given
        when a restarted model process restores a rollout (service.routing_memory)."""
        entry = self._entry(name)
        current = entry.rollout
        if current is not None and current.candidate != candidate:
            raise ConflictError(
                f"model {name} is already rolling out v{current.candidate}; promote or roll it "
                "back first"
            )
        if stable is not None and stable not in entry.deployments:  # restoring a rollout
            raise VersionNotFoundError(f"model {name} has no loaded version {stable} to keep")
        if stable is None and current is not None:
            stable = current.stable
        if stable is None and entry.default_version in entry.deployments:
            stable = entry.default_version if entry.default_version != candidate else None
        if stable is None:
            stable = max((v for v in entry.deployments if v != candidate), default=None)
        if stable is None:
            raise ConflictError(
                f"model {name} has no other loaded version to keep serving beside v{candidate}"
            )
        if current is not None and current.mode != mode:
            metrics.ROLLOUT_SHARE.labels(name, str(candidate), current.mode).set(0)
        entry.rollout = Rollout(mode, candidate, stable, share, now_iso())
        metrics.ROLLOUT_SHARE.labels(name, str(candidate), mode).set(share)
        self._changed()
        return entry.rollout

    def end_rollout(self, name: str, promote: bool) -> Rollout:
        """Promote (the candidate becomes the pinned default) or roll back (the stable version
        is pinned). One assignment each on the event loop: no request sees a mix."""
        entry = self._entry(name)
        rollout = entry.rollout
        if rollout is None:
            raise ConflictError(f"model {name} has no rollout to end")
        if promote and rollout.candidate not in entry.deployments:
            raise ConflictError(f"v{rollout.candidate} of {name} is not loaded; roll it back")
        entry.default_version = rollout.candidate if promote else rollout.stable
        self.abandon_rollout(name)
        return rollout

    def abandon_rollout(self, name: str) -> None:
        """Forget the rollout and change nothing else (its candidate failed to load)."""
        entry = self._entry(name)
        if entry.rollout is not None:
            rollout, entry.rollout = entry.rollout, None
            metrics.ROLLOUT_SHARE.labels(name, str(rollout.candidate), rollout.mode).set(0)
            self._changed()

    def delete_alias(self, name: str, alias: str) -> None:
        entry = self._entry(name)
        if entry.aliases.pop(alias, None) is None:
            raise VersionNotFoundError(f"model {name} has no alias {alias!r}")
        self._changed()

    # ---- routing ---------------------------------------------------------------------------

    def resolve(self, name: str | None, version: str | int | None, draw: float = 1.0) -> Deployment:
        """The deployment a request names; 404 for unknown names, 503 while not ready.
        `draw` (0..1, one per request) picks the canary for a request that names no version."""
        entry = self._entry(name)
        number = self._version_number(entry, version)
        rollout = entry.rollout
        if (
            rollout is not None
            and rollout.mode == "canary"
            and not version
            and draw < rollout.share
            and rollout.candidate in entry.deployments
        ):
            return entry.deployments[rollout.candidate]
        deployment = entry.deployments.get(number)
        if deployment is not None:
            return deployment
        if number in entry.loading:
            raise ModelNotReadyError(
                f"model {entry.name} v{number} is still loading", retry_after=2
            )
        if number in entry.failures:
            raise ModelNotReadyError(
                f"model {entry.name} v{number} failed to load: {entry.failures[number]}",
                retry_after=30,
            )
        loaded = ", ".join(str(v) for v in sorted(entry.deployments)) or "none"
        raise VersionNotFoundError(
            f"model {entry.name} has no version {number}; loaded versions: {loaded}"
        )

    def _default_name(self) -> str:
        if self.default_model:
            return self.default_model
        loaded = sorted(self._models) or sorted(self._configured)
        if not loaded and not self._started:  # the store scan has not named any model yet
            raise ModelNotReadyError("models are still loading", retry_after=2)
        if not loaded:
            raise ModelNotFoundError(f"no models are loaded from {self.store_root}")
        return loaded[0]

    def _entry(self, name: str | None) -> ModelEntry:
        name = name or self._default_name()
        entry = self._models.get(name)
        if entry is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFoundError(f"no model named {name!r}; loaded models: {known}")
        return entry

    def _version_number(self, entry: ModelEntry, version: str | int | None) -> int:
        """A version given as a number, an alias or nothing (the serving version)."""
        if version is None or version == "":
            serving = entry.serving_version()
            if serving is None:
                if entry.loading or not self._started:
                    raise ModelNotReadyError(f"model {entry.name} is still loading", retry_after=2)
                reasons = "; ".join(f"v{v}: {r}" for v, r in sorted(entry.failures.items()))
                raise ModelNotReadyError(
                    f"model {entry.name} has no version that loaded ({reasons or 'none in store'})",
                    retry_after=30,
                )
            return serving
        if isinstance(version, int) or VERSION_PATTERN.fullmatch(version):
            return int(version)
        if version in entry.aliases:
            return entry.aliases[version]
        aliases = ", ".join(sorted(entry.aliases)) or "none"
        shown = repr(version) if len(version) <= 40 else repr(version[:37]) + "..."
        raise VersionNotFoundError(
            f"model {entry.name} has no version or alias {shown}; versions are numbers of at "
            f"most 9 ASCII digits, aliases: {aliases}"
        )
