"""Routing choices that outlive the model process: default pins, aliases and rollouts.

They live in the model process's catalog, which a crash loses. The model process writes them
to the supervisor's private run directory on every change. A model process the supervisor
restarts reads them first and puts each one back the moment the versions it names are loaded,
in the same step as the load (before any request is routed), so a crash in the middle of a
10% canary does not hand the candidate, the highest version, every request. A new
`convserve serve` starts from the store alone, as always.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from service.atomic_file import write_atomically
from service.catalog import Catalog
from service.errors import ServiceError

log = logging.getLogger("convserve.models")
Choice = tuple[str, Callable[[], object]]  # (what it is, for the log; how to make it again)


class RoutingMemory:
    def __init__(self, path: Path, catalog: Catalog) -> None:
        self.path = path
        self.catalog = catalog
        self.pending: list[Choice] = []
        self.applying = False
        with contextlib.suppress(FileNotFoundError):
            for name, routing in json.loads(path.read_text()).items():
                self.pending += self._choices(name, routing)

    def changed(self) -> None:
        """The catalog's change listener: put back what now fits, then keep the state."""
        if self.applying:
            return
        if self.pending:
            self.applying = True
            try:
                self.pending = [choice for choice in self.pending if not self._made(choice)]
            finally:
                self.applying = False
            if not self.catalog.started:
                return  # more versions are loading: what is left may fit then
            for what, _ in self.pending:
                log.warning("not restored (its version did not load again): %s", what)
            self.pending = []
        self.save()

    def save(self) -> None:
        """Every model's pin, aliases and rollout, written whole and renamed into place."""
        snapshot = {
            name: {"default": model.default_version, "aliases": dict(model.aliases),
                   "rollout": dataclasses.asdict(model.rollout) if model.rollout else None}
            for name, model in self.catalog.status().models.items()
        }  # fmt: skip
        try:
            write_atomically(self.path, json.dumps(snapshot).encode(), ".routing-")
        except OSError as exc:  # the run directory is gone: the supervisor is stopping
            log.warning("could not keep the routing choices in %s: %s", self.path, exc)

    def _choices(self, name: str, routing: dict[str, object]) -> list[Choice]:
        catalog = self.catalog
        choices: list[Choice] = []
        default = routing.get("default")
        if isinstance(default, int):
            choices.append(
                (f"{name}: default v{default}", partial(catalog.set_default, name, default))
            )
        aliases = routing.get("aliases")
        for alias, version in aliases.items() if isinstance(aliases, dict) else []:
            choices.append((f"{name}: alias {alias} -> v{version}",
                            partial(catalog.set_alias, name, alias, version)))  # fmt: skip
        rollout = routing.get("rollout")
        if isinstance(rollout, dict):
            what = (
                f"{name}: {rollout['mode']} of v{rollout['candidate']} beside v{rollout['stable']}"
            )
            choices.append((what, partial(catalog.start_rollout, name, rollout["candidate"],
                                          rollout["mode"], rollout["share"],
                                          stable=rollout["stable"])))  # fmt: skip
        return choices

    @staticmethod
    def _made(choice: Choice) -> bool:
        try:
            choice[1]()
        except ServiceError:
            return False
        return True
