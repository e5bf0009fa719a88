"""The eager torch engine, and the ONNX export that ONNX Runtime serves from.

The torch half of service.engines: only processes that build networks import it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import torch
from torch import nn

from service.decisions import decision_facts
from service.engines import (
    ONNX_FILE,
    ONNX_META,
    OPSET,
    TOLERANCE,
    Engine,
    OnnxMeta,
    auto_choice,
    cache_folder,
    candidates,
    find_onnx,
    make_engine,
    onnx_sha,
)
from service.spec import sha256_file

log = logging.getLogger("convserve.engines")


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


def store_graph(graph: bytes, folder: Path, weights_sha: str) -> Path:
    """An imported file's normalized graph as `folder`'s ONNX file, with its sidecar."""
    import onnx

    path = folder / ONNX_FILE
    path.write_bytes(graph)
    imports = onnx.load_from_string(graph).opset_import
    opset = next((o.version for o in imports if o.domain in ("", "ai.onnx")), OPSET)
    meta = OnnxMeta(sha256_file(path), weights_sha, opset, "convserve import: normalized graph")
    (folder / ONNX_META).write_bytes(msgspec.json.encode(meta))
    return path


def ensure_onnx(module: nn.Module, input_shape: tuple[int, int, int], version_folder: Path,
                weights_sha: str, cache: Path) -> Path:  # fmt: skip
    """The version's ONNX file: the stored one when it matches, else the cached one, else a
    fresh export into `cache`/onnx/<weights sha256> (never into the store)."""
    found = find_onnx(version_folder, weights_sha, cache)
    if found is not None:
        return found
    folder = cache_folder(cache, weights_sha)
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
    """The engine a version serves with: `torch`, `onnxruntime` or `openvino` (verified against
    torch first), or `auto` (the fastest that agrees, measured on this machine once,
    service.decisions). Each records the decision, which lets the next start serve without
    torch (service.prepared). Any trouble with the ONNX file's engines leaves torch serving."""
    if policy == "torch":
        return torch_engine
    contenders: list[Engine] = []
    try:
        path = ensure_onnx(module, input_shape, version_folder, weights_sha, cache)
    except Exception as exc:  # exporters fail in many ways; torch still works
        log.warning("%s: no ONNX file (%s); serving with torch", version_folder, exc)
        return torch_engine
    for name in candidates(policy):
        try:
            contenders.append(make_engine(name, path, threads))
        except Exception as exc:  # a runtime that refuses the file: the others may not
            log.warning("%s: no %s engine (%s)", version_folder, name, exc)
    if not contenders:
        return torch_engine
    names = [engine.name for engine in contenders]
    facts = decision_facts(weights_sha, onnx_sha(path), input_shape, batch_size, threads, names)
    chosen = auto_choice(torch_engine, contenders, facts, cache, input_shape, batch_size)
    if chosen is None:
        log.warning("%s: %s and torch differ by more than %g; serving with torch",
                    version_folder, " and ".join(names), TOLERANCE)  # fmt: skip
        return torch_engine
    return chosen if policy == "auto" else contenders[0]
