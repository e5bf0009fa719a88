"""What loading a version worked out, remembered so that a restart does not work it out again:
the engine decision of CONVSERVE_ENGINE=auto, and the card (service.card) of its network.

Measuring torch against ONNX Runtime costs seconds per model at every start (resnet18: most
of the time to its engine). The outcome depends on the exact files, the machine and the
libraries, so it is recorded with all of them, in the cache directory (the server never writes
to its store), and used only when every one matches. A record from another machine, another
library version, another export or another thread count is measured again and replaced,
never trusted.

The card (layer table and heatmap layers) needs torch to work out. Kept beside the decision,
it lets a version whose engine is ONNX Runtime serve without importing torch at all
(service.prepared); torch comes in when a heatmap first asks for it. No torch here.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import platform
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np

from service.atomic_file import write_atomically
from service.card import Anatomy, ReadPoint
from service.config import available_cores

log = logging.getLogger("convserve.engines")


class Decision(msgspec.Struct):
    facts: dict[str, str]  # everything the measurement depended on
    engine: str  # "torch", "onnxruntime" or "openvino"
    difference: float  # the chosen engine's largest logit difference from torch (all disagree:
    # the smallest of theirs)
    timings_ms: dict[str, float]  # median batch time per engine
    differences: dict[str, float] = msgspec.field(default_factory=dict)  # per engine tried


class Card(msgspec.Struct):
    """A version's network as the torch side worked it out (service.anatomy, service.heatmaps)."""

    facts: dict[str, str]  # the files and the libraries it was worked out from
    anatomy: Anatomy
    layers: list[ReadPoint]
    warnings: list[str]


R = TypeVar("R", Decision, Card)


def torch_version() -> str:
    """The installed torch's version as torch.__version__ gives it (with its build, +cpu or
    +cu130: the timings differ), read from its version.py without importing torch (1.8 s)."""
    spec = importlib.util.find_spec("torch")
    for folder in (spec and spec.submodule_search_locations) or []:
        with contextlib.suppress(OSError):
            found = re.search(
                r"__version__\s*=\s*['\"]([^'\"]+)", (Path(folder) / "version.py").read_text()
            )
            if found:
                return found.group(1)
    return importlib.metadata.version("torch")


def _cpu() -> str:
    """The CPU model, as /proc/cpuinfo names it (the platform's name elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def decision_facts(
    weights_sha: str, onnx_sha: str, input_shape: tuple[int, int, int], batch_size: int,
    threads: int | None, engines: Sequence[str],
) -> dict[str, str]:  # fmt: skip
    """What the faster engine depends on: the files, the shape, the engines raced, the machine
    and the libraries."""
    import onnxruntime

    return {
        "engines": ",".join(engines),
        "openvino": importlib.metadata.version("openvino") if "openvino" in engines else "-",
        "weights_sha256": weights_sha,
        "onnx_sha256": onnx_sha,
        "input": "x".join(map(str, input_shape)),
        "batch": str(batch_size),
        "threads": str(threads or "library default"),
        "cpu": _cpu(),
        "cores": str(available_cores()),
        "machine": platform.machine(),
        "torch": torch_version(),
        "onnxruntime": str(onnxruntime.__version__),
        "numpy": str(np.__version__),
    }


def card_facts(weights_sha: str, spec: bytes) -> dict[str, str]:
    """What a card depends on: the weights, model.json (architecture, input) and torch."""
    return {
        "weights_sha256": weights_sha,
        "model_json_sha256": hashlib.sha256(spec).hexdigest(),
        "torch": torch_version(),
    }


def _path(cache: Path, kind: str, weights_sha: str) -> Path:
    return cache / kind / f"{weights_sha}.json"


def _read(path: Path, kind: type[R], facts: dict[str, str]) -> R | None:
    """The record at `path` when every fact matches; None (work it out again) otherwise."""
    try:
        record = msgspec.json.decode(path.read_bytes(), type=kind)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if record.facts != facts:
        changed = sorted(k for k in facts.keys() | record.facts.keys()
                         if facts.get(k) != record.facts.get(k))  # fmt: skip
        log.info("%s was worked out with another %s; working it out again", path,
                 ", ".join(changed))  # fmt: skip
        return None
    return record


def _write(path: Path, record: msgspec.Struct) -> None:
    """Write the record atomically; a cache that cannot be written only costs the next start."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, msgspec.json.encode(record), ".record-")
    except OSError as exc:
        log.warning("could not record %s (%s)", path, exc)


def recall(cache: Path, facts: dict[str, str]) -> Decision | None:
    """The recorded engine decision when every fact matches."""
    decision = _read(_path(cache, "engines", facts["weights_sha256"]), Decision, facts)
    if decision is None or decision.engine not in ("torch", *facts["engines"].split(",")):
        return None
    return decision


def remember(cache: Path, decision: Decision) -> None:
    _write(_path(cache, "engines", decision.facts["weights_sha256"]), decision)


def recall_card(cache: Path, facts: dict[str, str]) -> Card | None:
    return _read(_path(cache, "cards", facts["weights_sha256"]), Card, facts)


def remember_card(cache: Path, card: Card) -> None:
    _write(_path(cache, "cards", card.facts["weights_sha256"]), card)
