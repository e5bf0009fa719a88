"""The bundled models load and reach the held-out accuracy recorded in their model.json."""

from __future__ import annotations

import pytest
import torch

from service.imaging import DecodeLimits, prepare_image
from service.store import ModelStore
from tests.support import BUNDLED_STORE, held_out_digits, png_bytes


@pytest.mark.parametrize(("name", "floor"), [("digits", 0.97), ("lenet5", 0.96)])
def test_bundled_model_reaches_its_recorded_accuracy(name: str, floor: float) -> None:
    store = ModelStore(BUNDLED_STORE)
    version = max(store.versions(name))
    classifier = store.load(name, version, torch.device("cpu"))
    digits = held_out_digits(1000)
    # through the serving path: PNG bytes -> decode -> preprocess -> batch
    arrays = [
        prepare_image(png_bytes(d.image), classifier.spec.input, DecodeLimits(10**6)).array
        for d in digits
    ]
    predictions = classifier.predict(arrays).argmax(axis=1)
    accuracy = float((predictions == [d.label for d in digits]).mean())
    recorded = classifier.spec.metrics.accuracy
    assert recorded is not None
    assert recorded >= floor
    assert accuracy >= floor
    assert abs(accuracy - recorded) <= 0.005
