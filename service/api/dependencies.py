"""What route handlers ask Litestar for (the framework's types stay under service/api/)."""

from __future__ import annotations

from litestar.di import NamedDependency

from service.runtime import Runtime

RuntimeDep = NamedDependency[Runtime]
"""The app's runtime, provided by create_app()."""
