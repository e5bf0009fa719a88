"""Time to ready and the first requests, against the code before prepared versions served
without torch.

    .venv/bin/python -m benchmarks.first_request [--baseline-commit 90e71d6] [--steady 10000]

For the bundled digits and resnet18 (random init, imported: its ONNX file is in the store),
each at the default CONVSERVE_MAX_BATCH_SIZE (32) and worker count:
  - `before`: the baseline commit's code (0e73f0c: every start measures torch against ONNX
    Runtime and warms every batch size 1..32; 90e71d6: the decision is recorded, but every start
    imports torch and rebuilds the network);
  - `first start`: this code on an empty cache directory (it measures, then records);
  - `restart`: this code again on the same cache (the recorded decision is used).
Figures: process start to /health/ready 200; the first request; the p50 of the first 50
sequential requests against the p50 of 50 after `--steady` more (sent by 4 clients); a first
burst of 12 concurrent requests (new batch sizes) against a steady one. Writes
benchmarks/results/first_request.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.common import Server, markdown_table, write_results
from benchmarks.driver import ROOT, photo
from benchmarks.workers import checkout
from service.importing import import_torchvision
from service.store import ModelStore

DIGIT = ROOT / "docs" / "examples" / "digit-4.jpg"
STEADY_CLIENTS = 4


def timed_post(client: httpx.Client, path: str, body: bytes) -> float:
    started = time.perf_counter()
    response = client.post(path, content=body, headers={"content-type": "image/jpeg"})
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000.0


def burst(url: str, path: str, body: bytes, size: int) -> float:
    """Wall time (ms) of `size` concurrent requests."""
    clients = [httpx.Client(base_url=url) for _ in range(size)]
    with ThreadPoolExecutor(size) as pool:
        for c in clients:  # connections open before the clock starts
            c.get("/health/live")
        started = time.perf_counter()
        list(pool.map(lambda c: timed_post(c, path, body), clients))
        elapsed = (time.perf_counter() - started) * 1000.0
    for c in clients:
        c.close()
    return elapsed


def measure(server: Server, name: str, body: bytes, steady: int) -> dict[str, float]:
    ready = server.wait_ready()
    path = f"/models/{name}/predict"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first50 = [timed_post(client, path, body) for _ in range(50)]
        clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(STEADY_CLIENTS)]
        with ThreadPoolExecutor(STEADY_CLIENTS) as pool:  # the steady traffic, concurrently
            list(pool.map(lambda i: timed_post(clients[i % STEADY_CLIENTS], path, body),
                          range(steady)))  # fmt: skip
        for other in clients:
            other.close()
        later50 = [timed_post(client, path, body) for _ in range(50)]
    first_burst = burst(server.url, path, body, 12)
    steady_burst = statistics.median(burst(server.url, path, body, 12) for _ in range(5))
    return {"ready_s": ready, "first_ms": first50[0], "first50_p50_ms": statistics.median(first50),
            "later50_p50_ms": statistics.median(later50), "first_burst_ms": first_burst,
            "steady_burst_ms": steady_burst}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--baseline-commit", default="90e71d6", help="the code before")
    parser.add_argument("--steady", type=int, default=10_000,
                        help=f"requests between the 50s ({STEADY_CLIENTS} clients)")  # fmt: skip
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet18"),
                        default=["digits", "resnet18"], help="which models to run")  # fmt: skip
    options = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp, checkout(options.baseline_commit) as before:
        import_torchvision(ModelStore(Path(tmp) / "store"), "resnet18", "resnet18", weights=None)
        cases = [("digits", ROOT / "model_store", DIGIT.read_bytes()),
                 ("resnet18", Path(tmp) / "store", photo())]  # fmt: skip
        for name, store, body in [case for case in cases if case[0] in options.models]:
            ours = {"CONVSERVE_STORE": str(store), "CONVSERVE_CACHE_DIR": f"{tmp}/cache-{name}"}
            runs: list[tuple[str, dict[str, str], Path | None]] = [
                ("before", {"CONVSERVE_STORE": str(store)}, before),
                ("first start", ours, None),
                ("restart", ours, None),
            ]
            for label, env, code in runs:
                with Server(env, cwd=code) as server:
                    figures = measure(server, name, body, options.steady)
                results.append({"model": name, "run": label, **figures})
                rows.append([name, label, f"{figures['ready_s']:.2f}"] + [
                    f"{figures[key]:.1f}" for key in ("first_ms", "first50_p50_ms",
                                                      "later50_p50_ms", "first_burst_ms",
                                                      "steady_burst_ms")
                ])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["model", "run", "start to ready s", "first request ms", "p50 of the first 50 ms",
         f"p50 of 50 after {options.steady} more ms", "first burst of 12 ms",
         "steady burst ms"], rows)  # fmt: skip
    path = write_results("first_request", {"results": results}, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
