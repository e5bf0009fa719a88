"""A version prepared before serves without torch.

A full load (service.network) imports torch (1.8 s and 650 MB resident with the CUDA build),
builds and traces the network for its card, and decides the engine. When an earlier load on
this machine, with these libraries, recorded all of that for exactly these files
(service.decisions) and chose ONNX Runtime or OpenVINO, none of it needs doing again: the
version serves from its verified ONNX file with the recorded card, and its network is built
(torch imported) the first time a heatmap or the explorer asks for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service.classifier import Classifier
from service.config import Settings
from service.decisions import card_facts, decision_facts, recall, recall_card
from service.engines import ENGINES, TOLERANCE, candidates, find_onnx, make_engine, onnx_sha
from service.graph_files import load_graph_only
from service.spec import SPEC_FILE, ModelSpec
from service.store import read_checked

if TYPE_CHECKING:
    from service.network import Network

log = logging.getLogger("convserve.catalog")


def batch_size(spec: ModelSpec, settings: Settings) -> int:
    """The largest batch a version's batcher forms: its model.json's, else the setting."""
    overrides = spec.batching
    return (overrides and overrides.max_batch_size) or settings.max_batch_size


def compared_at(spec: ModelSpec, settings: Settings) -> int:
    """The batch size torch and ONNX Runtime are timed at when the engine is decided."""
    return min(8, batch_size(spec, settings))


def policy(spec: ModelSpec, settings: Settings, device: str) -> str:
    """The engine policy for a version: model.json's, else CONVSERVE_ENGINE; torch off the CPU
    (ONNX Runtime and OpenVINO run here on their CPU providers)."""
    return (spec.engine or settings.engine) if device == "cpu" else "torch"


def _builder(
    folder: Path, name: str, version: int, device: str, threads: int | None
) -> Callable[[], Network]:
    def build() -> Network:
        from service.network import build_network  # torch comes in here, on first need

        return build_network(folder, name, version, device, threads)

    return build


def load_prepared(
    folder: Path, name: str, version: int, settings: Settings, device: str
) -> Classifier | None:
    """The version on ONNX Runtime without torch, or None when it was not prepared (a full
    load is needed). ModelLoadError when its files are wrong, as a full load would say.
    A graph torch cannot run always serves this way (service.graph_files)."""
    graph_only = load_graph_only(folder, name, version, settings.threads, settings.engine)
    if graph_only is not None:
        return graph_only
    spec, warnings = read_checked(folder, name, version)
    if policy(spec, settings, device) == "torch":
        return None
    cache = settings.cache_dir
    card = recall_card(cache, card_facts(spec.sha256, (folder / SPEC_FILE).read_bytes()))
    path = find_onnx(folder, spec.sha256, cache)
    if card is None or path is None:
        return None
    shape = (spec.input.channels, spec.input.height, spec.input.width)
    chosen = policy(spec, settings, device)
    facts = decision_facts(spec.sha256, onnx_sha(path), shape, compared_at(spec, settings),
                           settings.threads, candidates(chosen))  # fmt: skip
    decision = recall(cache, facts)
    if decision is None or decision.difference > TOLERANCE:
        return None
    if chosen == "auto":
        if decision.engine not in ENGINES:  # torch was the faster
            return None
        chosen = decision.engine
    layers = {point.layer: point for point in card.layers}
    engine = make_engine(chosen, path, settings.threads)
    log.info("model %s v%d: prepared on this machine; %s serves it", name, version, chosen)
    builder = _builder(folder, name, version, device, settings.threads)
    return Classifier(
        name, version, spec, device, card.anatomy, layers, warnings + card.warnings, builder,
        engine,
    )  # fmt: skip
