"""TorchServe peer handler: a module-level entry point over the shared PeerModel.

TorchServe calls handle(None, context) once when the worker loads the model, then
handle(batch, context) with up to batchSize requests; each request's raw body arrives in
row["body"] (row["data"] for form uploads). Settings come from peer.json in the archive.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peer_model import PeerModel

_model: PeerModel | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[dict[str, Any]] | None:
    global _model
    if _model is None:
        folder = Path(context.system_properties["model_dir"])
        settings = json.loads((folder / "peer.json").read_text())
        os.environ["PEER_EVENTS"] = settings["events"]
        _model = PeerModel(settings["model_dir"], settings["threads"], settings["max_batch_size"])
    if data is None:
        return None
    arrays = [_model.prepare(bytes(row.get("body") or row.get("data") or b"")) for row in data]
    return _model.predict(arrays)
