"""The dependency of the routes that read or change the catalog itself (model cards,
readiness per model, management): only processes that hold the models serve them."""

from __future__ import annotations

from litestar.di import NamedDependency

from service.runtime import Runtime

RuntimeDep = NamedDependency[Runtime]
"""The models side of this process, from the app."""
