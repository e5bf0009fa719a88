"""LitServe peer: one inference worker, LitServe's batching (max_batch_size, batch_timeout).

    python benchmarks/peers/litserve_app.py --model-dir DIR --port N --threads T \
        [--max-batch-size 32] [--max-delay-ms 5]

POST /predict with a raw image body. LitServe parses JSON or forms by default; the request
parameter here is annotated as the raw body (a FastAPI dependency), so the image bytes travel
to the worker as they came. No `from __future__ import annotations`: LitServe reads the
annotation object off decode_request's signature.
"""

import os
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Depends, Request
from peer_model import PeerModel, arguments, say


async def _body(request: Request) -> bytes:
    return await request.body()


RawBody = Annotated[bytes, Depends(_body)]


class ImageAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = PeerModel(os.environ["PEER_MODEL_DIR"], int(os.environ["PEER_THREADS"]),
                               self.max_batch_size)  # fmt: skip

    def decode_request(self, request: RawBody) -> np.ndarray:
        return self.model.prepare(request)

    def batch(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return inputs  # PeerModel.predict stacks them

    def predict(self, x: list[np.ndarray]) -> list[dict[str, Any]]:
        return self.model.predict(x)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main() -> None:
    options = arguments()
    os.environ["PEER_MODEL_DIR"] = str(options.model_dir)
    os.environ["PEER_THREADS"] = str(options.threads)
    api = ImageAPI(max_batch_size=options.max_batch_size,
                   batch_timeout=options.max_delay_ms / 1000.0)  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=300)
    say(f"litserve {ls.__version__} port={options.port}")
    server.run(host="127.0.0.1", port=options.port, num_api_servers=1,
               generate_client_file=False, log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
