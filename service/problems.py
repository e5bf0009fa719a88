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
