"""Start-up and first-request latency, with and without warm-up.

    .venv/bin/python -m benchmarks.first_request

For each model and warm-up setting: process start to ready, the first request's latency, the
first burst of concurrent requests (new batch sizes), and the steady-state median of both.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.common import Server, markdown_table, write_results
from service.importing import import_torchvision
from service.store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
PHOTO = ROOT / "docs" / "examples" / "digit-4.jpg"


def timed_post(client: httpx.Client, path: str, body: bytes) -> float:
    started = time.perf_counter()
    response = client.post(path, content=body, headers={"content-type": "image/jpeg"})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000.0


def burst(url: str, path: str, body: bytes, size: int) -> float:
    """Wall time (ms) of `size` concurrent requests."""
    with ThreadPoolExecutor(size) as pool:
        clients = [httpx.Client(base_url=url) for _ in range(size)]
        started = time.perf_counter()
        list(pool.map(lambda c: timed_post(c, path, body), clients))
        elapsed = (time.perf_counter() - started) * 1000.0
        for c in clients:
            c.close()
    return elapsed


def measure(name: str, store: Path, warmup: bool, body: bytes, max_batch: int) -> dict[str, float]:
    env = {"CONVSERVE_STORE": str(store), "CONVSERVE_WARMUP": "1" if warmup else "0",
           "CONVSERVE_MAX_BATCH_SIZE": str(max_batch)}  # fmt: skip
    with Server(env) as server:
        ready = server.wait_ready()
        path = f"/models/{name}/predict"
        with httpx.Client(base_url=server.url) as client:
            first = timed_post(client, path, body)
            steady = statistics.median(timed_post(client, path, body) for _ in range(30))
        first_burst = burst(server.url, path, body, 12)
        steady_burst = statistics.median(burst(server.url, path, body, 12) for _ in range(5))
    return {"ready_s": ready, "first_ms": first, "steady_ms": steady,
            "first_burst_ms": first_burst, "steady_burst_ms": steady_burst}  # fmt: skip


def main() -> None:
    digit = PHOTO.read_bytes()
    photo = io.BytesIO()
    Image.open(PHOTO).convert("RGB").resize((640, 480)).save(photo, "JPEG", quality=90)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        import_torchvision(ModelStore(Path(tmp)), "resnet18", "resnet18", weights=None)
        cases = [("digits", ROOT / "model_store", digit, 32),
                 ("resnet18", Path(tmp), photo.getvalue(), 8)]  # fmt: skip
        for name, store, body, max_batch in cases:
            for warmup in (True, False):
                figures = measure(name, store, warmup, body, max_batch)
                results.append({"model": name, "warmup": warmup, "max_batch": max_batch, **figures})
                rows.append(
                    [name, "on" if warmup else "off", f"{figures['ready_s']:.2f}"]
                    + [
                        f"{figures[key]:.1f}"
                        for key in ("first_ms", "steady_ms", "first_burst_ms", "steady_burst_ms")
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["model", "warm-up", "start to ready s", "first request ms", "steady ms",
         "first burst of 12 ms", "steady burst ms"], rows)  # fmt: skip
    path = write_results("first_request", {"results": results}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
