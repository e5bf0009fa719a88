"""What route handlers ask Litestar for (the framework's types stay under service/api/)."""

from __future__ import annotations

from litestar.di import NamedDependency

from service.inference import Requests

RequestsDep = NamedDependency[Requests]
"""The request path of this process (decoding, drain state, the models), from the app."""
