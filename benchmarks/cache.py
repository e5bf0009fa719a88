"""The response cache: what an image sent again costs, against computing its answer.

    .venv/bin/python -m benchmarks.cache [--requests 200] [--models digits resnet18]

For the bundled digits (docs/examples/digit-4.jpg) and resnet18 (random init, imported; the
benchmark photo), each with and without a Grad-CAM heatmap, `convserve serve` at its default
worker count runs twice: with the cache off (CONVSERVE_CACHE_ENTRIES=0: every request decodes
and runs) and on (the default; after one request that fills it, every request is a hit). One
client sends `--requests` sequential requests of the same image (p50 and p99 latency), then
STEADY_CLIENTS clients send as many again (throughput). Writes benchmarks/results/cache.json
and .md.
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
from benchmarks.first_request import DIGIT, timed_post
from service.importing import import_torchvision
from service.store import ModelStore

STEADY_CLIENTS = 4
QUERIES = {"predict": "", "gradcam": "?heatmap=gradcam"}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(server: Server, path: str, body: bytes, count: int) -> dict[str, float]:
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        first = timed_post(client, path, body)  # fills the cache where it is on
        sequential = [timed_post(client, path, body) for _ in range(count)]
    clients = [httpx.Client(base_url=server.url, timeout=60) for _ in range(STEADY_CLIENTS)]
    with ThreadPoolExecutor(STEADY_CLIENTS) as pool:
        started = time.perf_counter()
        list(pool.map(lambda i: timed_post(clients[i % STEADY_CLIENTS], path, body),
                      range(count)))  # fmt: skip
        elapsed = time.perf_counter() - started
    for other in clients:
        other.close()
    return {"first_ms": first, "p50_ms": statistics.median(sequential),
            "p99_ms": quantile(sequential, 0.99), "rps": count / elapsed}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--requests", type=int, default=200, help="per measurement")
    parser.add_argument("--models", nargs="+", choices=("digits", "resnet18"),
                        default=["digits", "resnet18"], help="which models to run")  # fmt: skip
    options = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("digits", ROOT / "model_store", DIGIT.read_bytes())]
        if "resnet18" in options.models:
            store = Path(tmp) / "store"
            import_torchvision(ModelStore(store), "resnet18", "resnet18", weights=None)
            cases.append(("resnet18", store, photo()))
        for name, store, body in [case for case in cases if case[0] in options.models]:
            env = {"CONVSERVE_STORE": str(store), "CONVSERVE_CACHE_DIR": f"{tmp}/cache-{name}"}
            for kind, query in QUERIES.items():
                figures = {}
                for cache, entries in (("off", "0"), ("on", "4096")):
                    with Server({**env, "CONVSERVE_CACHE_ENTRIES": entries}) as server:
                        path = f"/models/{name}/predict{query}"
                        figures[cache] = measure(server, path, body, options.requests)
                off, on = figures["off"], figures["on"]
                results.append({"model": name, "request": kind, **figures})
                rows.append([name, kind, f"{on['first_ms']:.1f}",
                             f"{off['p50_ms']:.2f} / {off['p99_ms']:.2f}",
                             f"{on['p50_ms']:.2f} / {on['p99_ms']:.2f}",
                             f"{off['rps']:.0f}", f"{on['rps']:.0f}",
                             f"{off['p50_ms'] / on['p50_ms']:.1f}x"])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(
        ["model", "request", "first request (miss) ms", "cache off: p50 / p99 ms",
         "hits: p50 / p99 ms", f"cache off: req/s ({STEADY_CLIENTS} clients)",
         f"hits: req/s ({STEADY_CLIENTS} clients)", "p50 off / hit"], rows)  # fmt: skip
    written = write_results("cache", {"requests": options.requests, "results": results}, table)
    print(table)
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
