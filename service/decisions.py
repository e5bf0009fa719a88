"""The engine decision of CONVSERVE_ENGINE=auto, remembered so that a restart does not measure
again.

Measuring torch against ONNX Runtime costs seconds per model at every start (resnet18: most
of the time to its engine). The outcome depends on the exact files, the machine and the
libraries, so it is recorded with all of them, in the cache directory (the server never writes
to its store), and used only when every one matches. A record from another machine, another
library version, another export or another thread count is measured again and replaced,
never trusted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import torch

from service.config import available_cores

log = logging.getLogger("convserve.engines")


class Decision(msgspec.Struct):
    facts: dict[str, str]  # everything the measurement depended on
    engine: str  # "torch" or "onnxruntime"
    difference: float  # largest logit difference between the two engines
    timings_ms: dict[str, float]  # median batch time per engine


def _cpu() -> str:
    """The CPU model, as /proc/cpuinfo names it (the platform's name elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decision_facts(
    weights_sha: str, onnx_sha: str, input_shape: tuple[int, int, int], batch_size: int,
    threads: int,
) -> dict[str, str]:  # fmt: skip
    """What the faster engine depends on: the files, the shape, the machine and the libraries."""
    import onnxruntime

    return {
        "weights_sha256": weights_sha,
        "onnx_sha256": onnx_sha,
        "input": "x".join(map(str, input_shape)),
        "batch": str(batch_size),
        "threads": str(threads),
        "cpu": _cpu(),
        "cores": str(available_cores()),
        "machine": platform.machine(),
        "torch": str(torch.__version__),
        "onnxruntime": str(onnxruntime.__version__),
        "numpy": str(np.__version__),
    }


def _path(cache: Path, weights_sha: str) -> Path:
    return cache / "engines" / f"{weights_sha}.json"


def recall(cache: Path, facts: dict[str, str]) -> Decision | None:
    """The recorded decision when every fact matches; None (measure again) otherwise."""
    path = _path(cache, facts["weights_sha256"])
    try:
        decision = msgspec.json.decode(path.read_bytes(), type=Decision)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if decision.facts != facts:
        changed = sorted(k for k in facts.keys() | decision.facts.keys()
                         if facts.get(k) != decision.facts.get(k))  # fmt: skip
        log.info("%s was measured with another %s; measuring again", path, ", ".join(changed))
        return None
    if decision.engine not in ("torch", "onnxruntime"):
        return None
    return decision


def remember(cache: Path, decision: Decision) -> None:
    """Write the record atomically; a cache that cannot be written only costs the next start."""
    path = _path(cache, decision.facts["weights_sha256"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".decision-", dir=path.parent)
    except OSError as exc:
        log.warning("could not record the engine decision in %s (%s)", path.parent, exc)
        return
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(msgspec.json.encode(decision))
        Path(staging).replace(path)
    except OSError as exc:
        Path(staging).unlink(missing_ok=True)
        log.warning("could not record the engine decision in %s (%s)", path.parent, exc)
