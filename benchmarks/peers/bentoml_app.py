"""BentoML peer: one worker, a batchable API (BentoML's adaptive batching dispatcher).

    python benchmarks/peers/bentoml_app.py --model-dir DIR --port N --threads T \
        [--max-batch-size 32] [--max-delay-ms 5]

main() puts the settings in the environment and execs `bentoml serve bentoml_app:ImagePeer`
(the worker processes import this module again and read them from there).

POST /predict with a raw image body. BentoML's new SDK parses JSON, multipart forms and pickle
only; a small Serde registered for image/* hands the body bytes to the API as a one-item
list, which is how a batchable API takes each request. The answer is BentoML's: a JSON list
with one result. Dispatching, batching and the worker thread are BentoML's own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import bentoml
from _bentoml_impl import serde
from peer_model import PeerModel, arguments, say

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH_SIZE", "32"))


class RawImageSerde(serde.JSONSerde):
    """Request: the raw image body (one item); response: JSON, as BentoML writes it."""

    async def parse_request(self, request: Any, cls: Any) -> Any:
        body = await request.body()
        field = next(iter(cls.model_fields))
        return cls.model_validate({field: [body]})


for _media in ("image/jpeg", "image/png", "image/webp", "application/octet-stream"):
    serde.ALL_SERDE[_media] = type(  # ALL_SERDE is typed Mapping but is a dict
        "RawImageSerde", (RawImageSerde,), {"media_type": _media}
    )


@bentoml.service(
    workers=1,
    threads=1,
    traffic={"timeout": 300},
    logging={"access": {"enabled": False}},  # convserve is benchmarked at log level warning
)
class ImagePeer:
    def __init__(self) -> None:
        self.model = PeerModel(os.environ["PEER_MODEL_DIR"], int(os.environ["PEER_THREADS"]),
                               MAX_BATCH)  # fmt: skip

    # max_latency_ms is a deadline (requests past it are refused), not a batching delay:
    # BentoML's dispatcher chooses how long to wait for a batch by itself.
    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=60_000)
    def predict(self, images: list[bytes]) -> list[dict[str, Any]]:
        return self.model.predict([self.model.prepare(data) for data in images])


def main() -> None:
    options = arguments()
    os.environ.update(
        PEER_MODEL_DIR=str(options.model_dir),
        PEER_THREADS=str(options.threads),
        PEER_MAX_BATCH_SIZE=str(options.max_batch_size),
        BENTOML_DO_NOT_TRACK="true",
    )
    here = str(Path(__file__).resolve().parent)
    say(f"bentoml {bentoml.__version__} port={options.port}")
    command = ["bentoml", "serve", "bentoml_app:ImagePeer", "--working-dir", here,
               "--host", "127.0.0.1", "--port", str(options.port)]  # fmt: skip
    os.execv(sys.executable, [sys.executable, "-m", *command])


if __name__ == "__main__":
    main()
