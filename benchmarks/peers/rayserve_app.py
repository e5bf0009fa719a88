"""Ray Serve peer: one replica, Ray Serve's batching (`@serve.batch`).

    python benchmarks/peers/rayserve_app.py --model-dir DIR --port N --threads T \
        [--max-batch-size 32] [--max-delay-ms 5]

main() starts a private local Ray cluster (address="local": never one left running on this
machine), Serve's HTTP proxy on 127.0.0.1:N, and the application with one replica. It stays in
the foreground until SIGTERM, then shuts Ray down. benchmarks/peers.py (RayServe.environment)
sets the variables Ray reads when imported: every Ray process on 127.0.0.1, no usage stats,
no token file in ~/.ray, SIGTERM left to Python.

POST /predict with a raw image body: the replica reads the Starlette request's body and awaits
a `@serve.batch` method, which prepares the images and runs one forward pass per batch
(max_batch_size, batch_wait_timeout_s = max_delay_ms / 1000). Serve answers the returned dict
as JSON. max_ongoing_requests is raised from Serve's default (5) so that a batch can fill.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from peer_model import PeerModel, arguments, say
from ray import serve
from starlette.requests import Request

HERE = Path(__file__).resolve().parent
# convserve is benchmarked at log level warning, so the peer is too.
QUIET = {"enable_access_log": False, "log_level": "WARNING"}


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=1000,  # as TorchServe's job_queue_size: requests wait in the batcher
    logging_config=QUIET,
)
class ImagePeer:
    def __init__(self, model_dir: str, threads: int, max_batch_size: int, delay_s: float) -> None:
        self.model = PeerModel(model_dir, threads, max_batch_size)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(delay_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        return self.model.predict([self.model.prepare(body) for body in bodies])

    async def __call__(self, request: Request) -> dict[str, Any]:
        answer: dict[str, Any] = await self.predict_batch(await request.body())
        return answer


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main() -> None:
    options = arguments()
    # The replica is a Ray worker: it imports peer_model from here.
    paths = [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    # Ray's session folder holds Unix sockets, whose paths must stay short: not the run folder.
    temp = tempfile.mkdtemp(prefix="rayserve-peer-")
    signal.signal(signal.SIGTERM, _stop)  # ray.init sets one like it: SystemExit
    say(f"rayserve {ray.__version__} port={options.port} ray_temp={temp}")
    try:
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            _temp_dir=temp,
            logging_level="warning",
            log_to_driver=True,  # replica errors reach the peer log
        )
        serve.start(http_options={"host": "127.0.0.1", "port": options.port}, logging_config=QUIET)
        delay_s = options.max_delay_ms / 1000.0
        model = str(options.model_dir)
        app = ImagePeer.bind(model, options.threads, options.max_batch_size, delay_s)
        serve.run(app, name="peer", route_prefix="/predict", blocking=False)
        say("application running")
        while True:
            time.sleep(3600)
    finally:
        try:
            ray.shutdown()  # stops the local cluster this process started, Serve with it
        finally:
            shutil.rmtree(temp, ignore_errors=True)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
