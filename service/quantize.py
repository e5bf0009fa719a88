"""INT8 versions of imported graphs: ONNX Runtime's static quantization, calibrated on the
user's own images (`convserve import FILE --quantize int8 --calibrate DIR`). Only import
loads this (with onnxruntime's quantization tools); serving the result is plain ONNX Runtime.

Weights become int8 per output channel and activations uint8, as QuantizeLinear and
DequantizeLinear pairs around each quantizable op (the QDQ format ONNX Runtime and OpenVINO
both run with integer kernels); ranges come from the calibration images, preprocessed exactly
as the version will preprocess requests. What that costs in answers is measured, not assumed:
the top-1 agreement with the float graph on held-out images (`--held-out DIR`, else every fifth
calibration image, which calibration then does not see) and the speed-up, both recorded in
model.json's `arguments.quantization` and so on the card.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.errors import ServiceError
from service.imaging import DecodeLimits, prepare_image
from service.offline import find_inputs
from service.spec import InputSpec

HELD_OUT_EVERY = 5  # without --held-out, every fifth image is kept out of calibration
MIN_CALIBRATION = 8
METHOD = "ONNX Runtime static quantization: QDQ, int8 weights per channel, uint8 activations"
LOW_AGREEMENT = 0.9


@dataclass(frozen=True)
class Quantized:
    model: Any  # onnx.ModelProto
    facts: dict[str, Any]  # model.json's arguments.quantization
    notes: list[str]


def read_images(folder: Path, spec: InputSpec) -> tuple[list[np.ndarray], list[str]]:
    """Every image below `folder`, preprocessed as the version will; notes on files skipped."""
    arrays: list[np.ndarray] = []
    skipped: list[str] = []
    limits = DecodeLimits(max_pixels=50_000_000)
    for item in find_inputs([folder]):
        try:
            arrays.append(prepare_image(item.path.read_bytes(), spec, limits).array)
        except (OSError, ServiceError) as exc:
            skipped.append(f"{item.name}: {getattr(exc, 'detail', exc)}")
    return arrays, skipped


def split(
    calibrate: Path, held_out: Path | None, spec: InputSpec
) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Calibration and held-out images, and what was skipped; ValueError when too few."""
    images, skipped = read_images(calibrate, spec)
    if held_out is not None:
        kept, also = read_images(held_out, spec)
        calibration, skipped = images, skipped + also
    else:
        kept = images[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        calibration = [a for i, a in enumerate(images) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if len(calibration) < MIN_CALIBRATION or not kept:
        raise ValueError(
            f"{calibrate} gives {len(calibration)} calibration and {len(kept)} held-out images; "
            f"quantizing needs at least {MIN_CALIBRATION} and 1 (a few hundred like the traffic "
            "calibrate well)" + (f"; skipped: {'; '.join(skipped[:3])}" if skipped else "")
        )
    notes = [f"skipped {len(skipped)} files that are not images: {'; '.join(skipped[:3])}"]
    return calibration, kept, notes if skipped else []


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _outputs(session: Any, arrays: list[np.ndarray], batch: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: np.stack(arrays[i : i + batch])})[0]
        for i in range(0, len(arrays), batch)
    ]
    return np.concatenate(parts)


def _batch_ms(sessions: list[Any], arrays: list[np.ndarray], rounds: int = 7) -> list[float]:
    """Median time of one batch per session, run alternately so drift hits each alike."""
    name = sessions[0].get_inputs()[0].name
    batch = np.stack(arrays)
    times: list[list[float]] = [[] for _ in sessions]
    for session in sessions:
        session.run(None, {name: batch})
    for _ in range(rounds):
        for index, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(None, {name: batch})
            times[index].append((time.perf_counter() - started) * 1000.0)
    return [statistics.median(t) for t in times]


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """The calibration images, one at a time, as quantize_static reads them."""

    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self.items = iter([{name: array[None]} for array in arrays])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.items, None)


def quantize_int8(
    model: Any, spec: InputSpec, calibrate: Path, held_out: Path | None, batch: int
) -> Quantized:
    """The float graph `model` as an INT8 graph, with what it costs. `batch`: the largest batch
    the graph takes (1 when it runs image by image)."""
    calibration, kept, notes = split(calibrate, held_out, spec)
    reader = _Reader(model.graph.input[0].name, calibration)
    with tempfile.TemporaryDirectory(prefix="convserve-int8-") as folder:
        source, prepared, target = (Path(folder) / f for f in ("float.onnx", "pre.onnx", "q.onnx"))
        onnx.save(model, str(source))
        try:  # shape inference and folding first, as ONNX Runtime recommends
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception:  # not every graph takes it; quantizing works without
            prepared = source
        quantize_static(
            str(prepared), str(target), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        quantized = onnx.load(str(target))
    floating, integer = _session(model), _session(quantized)
    size = min(batch, 8)
    agreement = float(np.mean(
        _outputs(floating, kept, size).argmax(1) == _outputs(integer, kept, size).argmax(1)
    ))  # fmt: skip
    sample = (calibration * size)[:size]
    float_ms, int8_ms = _batch_ms([floating, integer], sample)
    facts = {
        "type": "int8", "method": METHOD, "calibration_images": len(calibration),
        "held_out_images": len(kept), "held_out": str(held_out) if held_out else
        f"every {HELD_OUT_EVERY}th image of {calibrate.name}",
        "top1_agreement": round(agreement, 4), "batch": size,
        "float_ms": round(float_ms, 3), "int8_ms": round(int8_ms, 3),
        "speedup": round(float_ms / int8_ms, 2),
    }  # fmt: skip
    notes.append(
        f"int8: top-1 agrees with the float graph on {agreement:.1%} of {len(kept)} held-out "
        f"images; {float_ms / int8_ms:.2f}x the float graph's speed at batch {size} in ONNX "
        "Runtime here"
    )
    if agreement < LOW_AGREEMENT:
        notes.append(
            f"WARNING: the int8 version agrees with the float one on only {agreement:.1%} of the "
            "held-out images: calibrate on more images like the traffic, or serve the float one"
        )
    return Quantized(quantized, facts, notes)
