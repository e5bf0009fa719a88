"""Soak: at least 20,000 mixed requests against one server, resident memory before and after.

    .venv/bin/python -m benchmarks.soak [--requests 20000] [--clients 16] [--bound-mib 64]

Traffic: plain predictions on both bundled models, 10% Grad-CAM, 5% invalid images. Memory is
read from /proc/<pid>/status (VmRSS) after a 1,000-request warm-up and at the end; the run
fails if it grew by more than the bound.
"""

from __future__ import annotations

import argparse
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import Server, markdown_table, write_results

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def images() -> list[bytes]:
    """The example digits, re-encoded with small variations so bodies differ."""
    out = []
    for path in sorted(EXAMPLES.glob("digit-*.jpg")):
        picture = Image.open(path).convert("L")
        for size in (28, 56, 112):
            buffer = io.BytesIO()
            picture.resize((size, size)).save(buffer, "PNG")
            out.append(buffer.getvalue())
    return out


def drive(url: str, count: int, clients: int, bodies: list[bytes]) -> dict[int, int]:
    rng = np.random.default_rng(0)
    plan = rng.random(count)
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    local = threading.local()
    opened: list[httpx.Client] = []

    def send(index: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=60)
            with lock:
                opened.append(local.client)
        body = bodies[index % len(bodies)]
        draw = plan[index]
        if draw < 0.05:
            path, body = "/predict", b"definitely not an image"
        elif draw < 0.15:
            path = "/predict?heatmap=gradcam"
        elif draw < 0.55:
            path = "/models/lenet5/predict"
        else:
            path = "/predict"
        status = local.client.post(
            path, content=body, headers={"content-type": "image/png"}
        ).status_code
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(send, range(count)))
    for client in opened:
        client.close()
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bound-mib", type=float, default=64.0)
    args = parser.parse_args()
    bodies = images()
    with Server({}) as server:
        server.wait_ready()
        pid = server.process.pid
        drive(server.url, 1000, args.clients, bodies)
        before = rss_mib(pid)
        started = time.perf_counter()
        statuses = drive(server.url, args.requests, args.clients, bodies)
        seconds = time.perf_counter() - started
        after = rss_mib(pid)
    growth = after - before
    ok = growth <= args.bound_mib and set(statuses) <= {200, 400}
    table = markdown_table(
        ["requests", "clients", "seconds", "req/s", "statuses", "RSS before MiB", "RSS after MiB",
         "growth MiB", "bound MiB", "verdict"],
        [[str(args.requests), str(args.clients), f"{seconds:.1f}", f"{args.requests / seconds:.0f}",
          ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())), f"{before:.1f}",
          f"{after:.1f}", f"{growth:+.1f}", f"{args.bound_mib:.0f}", "pass" if ok else "FAIL"]],
    )  # fmt: skip
    figures = {
        "requests": args.requests, "clients": args.clients, "seconds": seconds,
        "statuses": statuses, "rss_before_mib": before, "rss_after_mib": after,
        "bound_mib": args.bound_mib, "ok": ok,
    }  # fmt: skip
    path = write_results("soak", figures, table)
    print(table)
    print(f"wrote {path}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
