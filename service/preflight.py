"""What `convserve serve` checks before it starts anything: a store it can serve from.

A server that reports ready with nothing to serve, or 404s every request because its default
model is not there, looks healthy to a load balancer and is useless to its users. So a missing
store, a store with no models, a default model or a CONVSERVE_MODELS entry that is not in the
store stops start-up with one line that says what to do. CONVSERVE_ALLOW_EMPTY=1 is the
explicit way to start anyway (models arrive later, by store watching); an empty store that is
watched needs no such setting. No torch here: the supervisor runs this.
"""

from __future__ import annotations

from pathlib import Path

from service.config import Settings, SettingsError
from service.spec import NAME_PATTERN, stored_names, stored_versions

ALLOW = "or set CONVSERVE_ALLOW_EMPTY=1 (--allow-empty) to start without it"


def servable_names(settings: Settings) -> list[str]:
    """Models in the store with at least one complete version."""
    return [name for name in stored_names(settings.store) if stored_versions(settings.store, name)]


def _overlaps(one: Path, other: Path) -> bool:
    return one == other or one in other.parents or other in one.parents


def check_capture(settings: Settings) -> None:
    """The capture dir holds what users send: never the store, whose every file is verified.
    The dataset the review page writes neither: nor the capture dir, which it empties."""
    capture, dataset = settings.capture_dir, settings.labelled_dir
    store = settings.store.resolve()
    if capture is not None and _overlaps(capture.resolve(), store):
        raise SettingsError(
            f"CONVSERVE_CAPTURE_DIR={str(capture)!r} (--capture-dir): it overlaps the model store "
            f"{store}; captured images must go elsewhere"
        )
    if dataset is None:
        return
    where = f"CONVSERVE_DATASET_DIR={str(dataset)!r} (--dataset-dir)"
    if _overlaps(dataset.resolve(), store):
        raise SettingsError(
            f"{where}: it overlaps the model store {store}; labelled images must go elsewhere"
        )
    if capture is not None and _overlaps(dataset.resolve(), capture.resolve()):
        raise SettingsError(
            f"{where}: it overlaps the capture dir {capture.resolve()}; labelled images must go "
            "beside it, not inside it (the default is <capture dir>-labelled)"
        )


def check_store(settings: Settings) -> None:
    """Raise SettingsError, naming the setting and the fix, when the store cannot serve."""
    check_capture(settings)
    if settings.allow_empty:
        return
    store = settings.store
    where = f"CONVSERVE_STORE={str(store)!r} (--store)"
    if not store.exists():
        raise SettingsError(
            f"{where}: there is no directory {store.resolve()}; point it at a model store "
            f"(docs/models.md), {ALLOW}"
        )
    if not store.is_dir():
        raise SettingsError(f"{where}: not a directory; point it at a model store (docs/models.md)")
    names = servable_names(settings)
    known = ", ".join(names) or "none"
    missing = [
        name for name in settings.models if not NAME_PATTERN.fullmatch(name) or name not in names
    ]
    if missing:
        raise SettingsError(
            f"CONVSERVE_MODELS (--models): {', '.join(missing)} not in the store {store} "
            f"(models there: {known}); fix the list, {ALLOW}"
        )
    default = settings.default_model
    if default is not None and default not in (settings.models or names):
        raise SettingsError(
            f"CONVSERVE_DEFAULT_MODEL={default!r} (--default-model): not among the models served "
            f"from {store} ({', '.join(settings.models) or known}); name one of them, {ALLOW}"
        )
    if not names and not settings.watch:
        raise SettingsError(
            f"{where}: the store has no models; add one (convserve import or convserve train), "
            f"watch the store for new ones (CONVSERVE_WATCH=1), {ALLOW}"
        )
