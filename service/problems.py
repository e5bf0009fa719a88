"""RFC 9457 problem details: the one body every error leaves as, from the app or the protocol."""

from __future__ import annotations

import msgspec

PROBLEM_TYPE = "application/problem+json"
PROBLEM_BASE = "https://convserve.dev/problems/"


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    error: str | None = None  # Open Inference Protocol clients read this member


def problem_json(
    status: int, title: str, slug: str, detail: str, instance: str | None = None
) -> bytes:
    """The encoded body; under /v2 it repeats the detail as `error`, the member Open Inference
    Protocol clients read (RFC 9457 allows extensions)."""
    error = detail if instance is not None and instance.startswith("/v2") else None
    problem = Problem(PROBLEM_BASE + slug, title, status, detail, instance, error)
    return msgspec.json.encode(problem)
