"""Inference engines: the interface, ONNX Runtime, and the choice between it and eager torch.

The ONNX file is a derived artifact: `convserve import` and `train` write it beside the weights
(model.onnx, with model.onnx.json recording its own hash and the weights' hash it came from).
The server never writes to its store: a version without a matching file gets one exported
into the cache directory (CONVSERVE_CACHE_DIR), keyed by the weights' hash
(service.torch_engine). ONNX Runtime and OpenVINO both run that file; each is checked against
torch numerically (1e-4) before it may serve.
No torch here: a version prepared for ONNX Runtime serves without it (service.prepared).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from service.decisions import Decision, recall, remember
from service.spec import sha256_file

log = logging.getLogger("convserve.engines")
ONNX_FILE = "model.onnx"
ONNX_META = "model.onnx.json"
OPSET = 18
TOLERANCE = 1e-4


class Engine(Protocol):
    name: str

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) float32 -> (N, classes) float32 raw logits."""
        ...


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort  # only where a version serves with it

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's own, the physical cores
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: torch, the decoders and the event loop need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input: batch})[0]
        return out


class OpenVinoEngine:
    """OpenVINO's CPU plugin on the same ONNX file, in float32 (no bf16 shortcuts on CPUs
    that have them: the answers must agree with torch to 1e-4)."""

    name = "openvino"

    def __init__(self, path: Path, threads: int | None) -> None:
        import openvino as ov  # only where a version serves with it

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the batcher hands it whole batches
            "ENABLE_CPU_PINNING": False,  # the decoders and the event loop share the cores
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = compiled.create_infer_request()  # the batcher's one inference thread
        self.output = compiled.output(0)
        self.path = path

    def logits(self, batch: np.ndarray) -> np.ndarray:
        # the request reuses its output buffer: copy before the next batch overwrites it
        return np.array(self.request.infer({0: batch})[self.output], copy=True)


ENGINES: dict[str, type[OnnxEngine] | type[OpenVinoEngine]] = {
    OnnxEngine.name: OnnxEngine,
    OpenVinoEngine.name: OpenVinoEngine,
}  # the engines that run a version's ONNX file; torch runs its network


def candidates(policy: str) -> list[str]:
    """The ONNX-file engines a policy lets race torch: `auto` all of them, else the one named."""
    return list(ENGINES) if policy == "auto" else [policy]


def make_engine(name: str, path: Path, threads: int | None) -> Engine:
    engine: Engine = ENGINES[name](path, threads)
    return engine


class OnnxMeta(msgspec.Struct):
    sha256: str  # of model.onnx
    weights_sha256: str  # of the weights.safetensors it was exported from
    opset: int
    exporter: str


def valid_onnx(folder: Path, weights_sha: str) -> Path | None:
    """`folder`'s ONNX file when its sidecar matches the weights and the file its own hash."""
    path, meta_path = folder / ONNX_FILE, folder / ONNX_META
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = msgspec.json.decode(meta_path.read_bytes(), type=OnnxMeta)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if meta.weights_sha256 != weights_sha or meta.sha256 != sha256_file(path):
        log.warning("%s does not match its weights or its recorded hash; re-exporting", path)
        return None
    return path


def cache_folder(cache: Path, weights_sha: str) -> Path:
    return cache / "onnx" / weights_sha


def find_onnx(version_folder: Path, weights_sha: str, cache: Path) -> Path | None:
    """The version's ONNX file: the stored one when it matches, else a cached one."""
    found = valid_onnx(version_folder, weights_sha)
    return found or valid_onnx(cache_folder(cache, weights_sha), weights_sha)


def check_agreement(a: Engine, b: Engine, input_shape: tuple[int, int, int]) -> float:
    """Largest logit difference between two engines on seeded random batches of 1 and 4."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in (1, 4):
        batch = rng.normal(size=(size, *input_shape)).astype(np.float32)
        worst = max(worst, float(np.abs(a.logits(batch) - b.logits(batch)).max()))
    return worst


def race(engines: Sequence[Engine], batch: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Median batch time (ms) of each engine over `rounds` alternating runs, after one untimed
    run each. Alternating, the machine's drift hits both alike, so three rounds decide
    (resnet18's engines differ by 30% here); each round more costs a first start 0.3 s."""
    samples: dict[str, list[float]] = {engine.name: [] for engine in engines}
    for engine in engines:
        engine.logits(batch)
    for _ in range(rounds):
        for engine in engines:
            started = time.perf_counter()
            engine.logits(batch)
            samples[engine.name].append((time.perf_counter() - started) * 1000.0)
    return {name: statistics.median(times) for name, times in samples.items()}


def onnx_sha(path: Path) -> str:
    """The ONNX file's sha256 as its (already verified) sidecar records it."""
    return msgspec.json.decode((path.parent / ONNX_META).read_bytes(), type=OnnxMeta).sha256


def auto_choice(torch_engine: Engine, contenders: Sequence[Engine], facts: dict[str, str],
                cache: Path, input_shape: tuple[int, int, int], batch_size: int,
                ) -> Engine | None:  # fmt: skip
    """The fastest of torch and the `contenders` that agree with it, as recorded for these
    exact facts or measured now (and then recorded); None when none of them agrees."""
    decision = recall(cache, facts)
    if decision is None:
        differences = {c.name: check_agreement(c, torch_engine, input_shape) for c in contenders}
        agreeing = [c for c in contenders if differences[c.name] <= TOLERANCE]
        engine, timings = "torch", {}
        if agreeing:
            batch = np.zeros((batch_size, *input_shape), dtype=np.float32)
            timings = race((torch_engine, *agreeing), batch)
            engine = min(timings, key=lambda name: timings[name])
        difference = differences.get(engine, 0.0) if agreeing else min(differences.values())
        decision = Decision(facts, engine, difference, timings, differences)
        remember(cache, decision)
        how = "measured"
    else:
        how = "recorded for this machine and these libraries"
    if decision.difference > TOLERANCE:
        return None
    measured = ", ".join(f"{name} {ms:.2f} ms" for name, ms in decision.timings_ms.items())
    log.info("engine auto at batch %d: %s -> %s (%s)", batch_size, measured, decision.engine, how)
    return next((c for c in contenders if c.name == decision.engine), torch_engine)
