"""The naive baseline: the same model in a plain Litestar route, one forward pass per request,
no batching, eager torch.

    CONVSERVE_STORE=... CONVSERVE_PORT=8000 NAIVE_MODEL=digits \
        .venv/bin/python -m benchmarks.naive_server
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from litestar import Litestar, Request, get, post

from service.imaging import DecodeLimits, prepare_image
from service.store import ModelStore

STORE = ModelStore(Path(os.environ["CONVSERVE_STORE"]))
NAME = os.environ["NAIVE_MODEL"]
CLASSIFIER = STORE.load(NAME, max(STORE.versions(NAME)), torch.device("cpu"))


@post("/predict", sync_to_thread=True, status_code=200)
def predict(request: Request[Any, Any, Any], body: bytes) -> dict[str, Any]:
    array = prepare_image(body, CLASSIFIER.spec.input, DecodeLimits(40_000_000)).array
    with torch.inference_mode():
        logits = CLASSIFIER.module(torch.from_numpy(array[None]))
        probabilities = torch.softmax(logits, dim=1)[0].numpy()
    top = np.argsort(-probabilities)[:5]
    labels = CLASSIFIER.labels
    return {"predictions": [{"label": labels[i], "class_index": int(i),
                             "probability": float(probabilities[i])} for i in top]}  # fmt: skip


@get("/ready")
async def ready() -> dict[str, bool]:
    return {"ready": True}


if __name__ == "__main__":
    threads = os.environ.get("NAIVE_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    app = Litestar([predict, ready], logging_config=None)
    port = int(os.environ.get("CONVSERVE_PORT", "8000"))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
