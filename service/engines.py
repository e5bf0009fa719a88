"""Inference engines: eager torch, and ONNX Runtime exported from the same torch module.

The ONNX file is a derived artifact: `convserve import` and `train` write it beside the weights
(model.onnx, with model.onnx.json recording its own hash and the weights' hash it came from).
The server never writes to its store: a version without a matching file gets one exported
into the cache directory (CONVSERVE_CACHE_DIR), keyed by the weights' hash. It is checked
against torch numerically (1e-4) before it may serve; torch always stays loaded, for heatmaps
and as the fallback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np
import torch
from torch import nn

from service.decisions import Decision, decision_facts, recall, remember
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


class TorchEngine:
    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device

    def logits(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(batch)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            out: np.ndarray = self.module(tensor).float().cpu().numpy()
        return out


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: torch, the decoders and the event loop need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.path = path

    def logits(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input: batch})[0]
        return out


class OnnxMeta(msgspec.Struct):
    sha256: str  # of model.onnx
    weights_sha256: str  # of the weights.safetensors it was exported from
    opset: int
    exporter: str


def export_onnx(module: nn.Module, input_shape: tuple[int, int, int], path: Path) -> None:
    """torch.export -> ONNX with a dynamic batch dimension, weights embedded in the file."""
    module = module.to("cpu").eval()
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its passes
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=OPSET,
            verbose=False,
        )
    assert program is not None
    program.save(str(path), external_data=False)


def write_onnx(
    module: nn.Module, input_shape: tuple[int, int, int], folder: Path, weights_sha: str
) -> Path:
    """Export into `folder` with its sidecar; the caller picks a writable folder."""
    path = folder / ONNX_FILE
    export_onnx(module, input_shape, path)
    meta = OnnxMeta(sha256_file(path), weights_sha, OPSET, f"torch {torch.__version__}")
    (folder / ONNX_META).write_bytes(msgspec.json.encode(meta))
    return path


def _valid(folder: Path, weights_sha: str) -> Path | None:
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


def ensure_onnx(module: nn.Module, input_shape: tuple[int, int, int], version_folder: Path,
                weights_sha: str, cache: Path) -> Path:  # fmt: skip
    """The version's ONNX file: the stored one when it matches, else the cached one, else a
    fresh export into `cache`/onnx/<weights sha256> (never into the store)."""
    found = _valid(version_folder, weights_sha)
    if found is not None:
        return found
    folder = cache / "onnx" / weights_sha
    found = _valid(folder, weights_sha)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-", dir=folder))
    try:
        write_onnx(module, input_shape, staging, weights_sha)
        for name in (ONNX_FILE, ONNX_META):
            (staging / name).replace(folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: exported its ONNX file into the cache %s", version_folder, folder)
    return folder / ONNX_FILE


def check_agreement(a: Engine, b: Engine, input_shape: tuple[int, int, int]) -> float:
    """Largest logit difference between two engines on seeded random batches of 1 and 4."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in (1, 4):
        batch = rng.normal(size=(size, *input_shape)).astype(np.float32)
        worst = max(worst, float(np.abs(a.logits(batch) - b.logits(batch)).max()))
    return worst


def median_ms(engine: Engine, batch: np.ndarray, repeats: int = 7) -> float:
    engine.logits(batch)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.logits(batch)
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples)


def onnx_sha(path: Path) -> str:
    """The ONNX file's sha256 as its (already verified) sidecar records it."""
    return msgspec.json.decode((path.parent / ONNX_META).read_bytes(), type=OnnxMeta).sha256


def auto_choice(torch_engine: Engine, onnx: OnnxEngine, facts: dict[str, str], cache: Path,
                input_shape: tuple[int, int, int], batch_size: int) -> Engine | None:  # fmt: skip
    """`auto`: the faster engine, as recorded for these exact facts or measured now (and then
    recorded); None when the two disagree numerically."""
    decision = recall(cache, facts)
    if decision is None:
        difference = check_agreement(onnx, torch_engine, input_shape)
        timings: dict[str, float] = {}
        engine = "torch"
        if difference <= TOLERANCE:
            batch = np.zeros((batch_size, *input_shape), dtype=np.float32)
            timings = {e.name: median_ms(e, batch) for e in (torch_engine, onnx)}
            engine = min(timings, key=lambda name: timings[name])
        decision = Decision(facts, engine, difference, timings)
        remember(cache, decision)
        how = "measured"
    else:
        how = "recorded for this machine and these libraries"
    if decision.difference > TOLERANCE:
        return None
    measured = ", ".join(f"{name} {ms:.2f} ms" for name, ms in decision.timings_ms.items())
    log.info("engine auto at batch %d: %s -> %s (%s)", batch_size, measured, decision.engine, how)
    return onnx if decision.engine == onnx.name else torch_engine


def select_engine(
    module: nn.Module,
    torch_engine: Engine,
    input_shape: tuple[int, int, int],
    version_folder: Path,
    weights_sha: str,
    cache: Path,
    policy: str,
    threads: int | None,
    batch_size: int,
) -> Engine:
    """The engine a version serves with: `torch`, `onnxruntime` (verified first), or `auto`
    (the faster of the two, measured on this machine once, service.decisions). Any ONNX
    trouble leaves torch serving."""
    if policy == "torch":
        return torch_engine
    try:
        path = ensure_onnx(module, input_shape, version_folder, weights_sha, cache)
        onnx = OnnxEngine(path, threads)
    except Exception as exc:  # exporters and runtimes fail in many ways; torch still works
        log.warning("%s: no ONNX Runtime engine (%s); serving with torch", version_folder, exc)
        return torch_engine
    chosen: Engine | None = onnx
    if policy == "auto":
        facts = decision_facts(weights_sha, onnx_sha(path), input_shape, batch_size,
                               threads or torch.get_num_threads())  # fmt: skip
        chosen = auto_choice(torch_engine, onnx, facts, cache, input_shape, batch_size)
    elif check_agreement(onnx, torch_engine, input_shape) > TOLERANCE:
        chosen = None
    if chosen is None:
        log.warning("%s: ONNX and torch differ by more than %g; serving with torch",
                    version_folder, TOLERANCE)  # fmt: skip
        return torch_engine
    return chosen
