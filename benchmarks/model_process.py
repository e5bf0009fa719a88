"""The model process alone: how many requests one model process serves, and what each costs it,
with no HTTP and no decoding in front.

    .venv/bin/python -m benchmarks.model_process [--models digits resnet18] [--seconds 6]
        [--callers 2] [--inflight 16] [--threads N]

Starts `python -m service.modelhost` on a Unix socket, as the supervisor does, and drives it
from --callers processes that speak the front workers' protocol (service.link.RemoteModels).
Each keeps --inflight requests going, each made as a front worker makes it for the model's
benchmark image: admit one image, write its array into shared memory, run; first route it too
when the image is over 64 KiB (service.api.uploads.small_body). Reports requests/s, the model
process's CPU (cores, and microseconds per request), the mean batch, and the forward pass's own
CPU per image at that batch size (the engine the model process chose, in this process, the
same threads). The difference is the model process's own work per request (the calls,
batching, metrics): the part a faster device does not shrink. On a node where many front
workers feed one device, it sets the ceiling of the one model process (docs/benchmarks.md,
"Processes").
Writes benchmarks/results/model_process.json and model_process.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import uvloop

from benchmarks.common import markdown_table, write_results
from benchmarks.driver import CPU, ROOT, Model, prepare_models, process_cpu
from service.api.uploads import SMALL_BODY_BYTES
from service.channel import Forward
from service.config import Settings, default_cache
from service.engines import ENGINES, Engine, make_engine
from service.link import RemoteModels
from service.store import ModelStore
from service.torch_engine import ensure_onnx

ARENA_BYTES = 256 << 20
WARMUP_S = 2.0


@dataclass
class Row:
    model: str
    engine: str
    calls: int  # to the model process per request: 2, or 3 with the route before the body
    callers: int
    inflight: int
    requests_per_s: float
    model_cores: float
    model_us_per_request: float
    mean_batch: float
    forward_us_per_image: float

    @property
    def own_us_per_request(self) -> float | None:
        """None where the forward pass is nearly all of it: the difference is then noise."""
        own = self.model_us_per_request - self.forward_us_per_image
        return own if own > 0.1 * self.model_us_per_request else None


# ---- a caller: one process, as a front worker ------------------------------------------------


async def _drive(
    socket_path: Path, model: str, routed: bool, inflight: int, start: float, end: float
) -> None:
    """Keep `inflight` requests going until `end`, each routed first when `routed`; print how
    many ended in [start, end], and the sum of 1/batch size over them (so the parent can count
    batches)."""
    remote = RemoteModels(socket_path, ARENA_BYTES, lambda: None)
    await remote.start()
    await remote.wait_ready(lambda: time.monotonic() > end)
    route = await remote.route(model, None)
    array = np.random.default_rng(0).random(route.input_shape, dtype=np.float32)
    done, batches = 0, 0.0

    async def requests() -> None:
        nonlocal done, batches
        while time.monotonic() < end:
            if routed:
                await remote.route(model, None)
            async with remote.admit(model, None, 1) as ticket:
                (answer,) = await remote.run(ticket, [array], end + 60, None, None)
            if start <= time.monotonic() <= end:
                done += 1
                batches += 1 / answer.batch_size

    await asyncio.gather(*(requests() for _ in range(inflight)))
    await remote.stop()
    print(json.dumps({"requests": done, "batches": batches}), flush=True)


def caller_main(argv: list[str]) -> None:
    socket_path, model, routed, inflight, start, end = argv
    uvloop.run(
        _drive(Path(socket_path), model, routed == "1", int(inflight), float(start), float(end))
    )


# ---- the parent --------------------------------------------------------------------------------


async def _engine_name(socket_path: Path, model: str) -> str:
    """The engine the model process serves `model` with, from its model card."""
    remote = RemoteModels(socket_path, 1 << 20, lambda: None)
    await remote.start()
    try:
        await asyncio.wait_for(remote.wait_ready(lambda: False), 300)
        card = await remote.forward(Forward("GET", f"/models/{model}", b"", [], b"", None))
    finally:
        await remote.stop()
    return str(json.loads(card.body)["engine"])


def _forward_us(model: Model, engine_name: str, threads: int, batch: int) -> float:
    """CPU microseconds per image of the forward pass alone, at `batch`, in this process."""
    store = ModelStore(model.store)
    classifier = store.load(model.name, 1, CPU)
    engine: Engine = classifier.torch_engine
    if engine_name in ENGINES:
        folder = store.path(model.name, 1)
        onnx = ensure_onnx(classifier.module, classifier.input_shape, folder,
                           classifier.spec.sha256, default_cache())  # fmt: skip
        engine = make_engine(engine_name, onnx, threads)
    inputs = np.random.default_rng(0).random((batch, *classifier.input_shape), dtype=np.float32)
    engine.logits(inputs)
    started, calls = time.process_time(), 0
    budget = time.perf_counter() + 3.0
    while time.perf_counter() < budget or calls < 3:
        engine.logits(inputs)
        calls += 1
    return (time.process_time() - started) / (calls * batch) * 1e6


def _window(socket_path: Path, pid: int, model: str, routed: bool,
            options: argparse.Namespace) -> tuple[float, float, float]:  # fmt: skip
    """Requests done, batches and the model process's CPU seconds over one measured window."""
    start = time.monotonic() + WARMUP_S
    end = start + options.seconds
    flag = "1" if routed else "0"
    caller = [sys.executable, "-m", "benchmarks.model_process", "--caller", str(socket_path),
              model, flag, str(options.inflight), str(start), str(end)]  # fmt: skip
    callers = [
        subprocess.Popen(caller, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(options.callers)
    ]
    time.sleep(max(start - time.monotonic(), 0.0))
    cpu_before = process_cpu(pid)
    time.sleep(max(end - time.monotonic(), 0.0))
    cpu = process_cpu(pid) - cpu_before
    counts = [json.loads(c.communicate(timeout=120)[0].strip().splitlines()[-1]) for c in callers]
    return sum(c["requests"] for c in counts), sum(c["batches"] for c in counts), cpu


def measure(model: Model, options: argparse.Namespace, folder: Path) -> list[Row]:
    """As a front worker calls for the model's benchmark image; for a small one (2 calls) also
    routed first (3 calls, as for a body over 64 KiB), against the same model process."""
    settings = Settings.from_env({"CONVSERVE_STORE": str(model.store),
                                  "CONVSERVE_MODELS": model.name,
                                  "CONVSERVE_THREADS": str(options.threads),
                                  "CONVSERVE_LOG_LEVEL": "warning"})  # fmt: skip
    socket_path = folder / f"{model.name}.sock"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder / f"metrics-{model.name}")}
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
    command = [sys.executable, "-m", "service.modelhost", json.dumps(settings.to_env()),
               str(socket_path)]  # fmt: skip
    variants = [True] if len(model.body) > SMALL_BODY_BYTES else [False, True]
    host = subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    try:
        engine_name = uvloop.run(_engine_name(socket_path, model.name))
        windows = [_window(socket_path, host.pid, model.name, v, options) for v in variants]
    finally:
        host.terminate()
        host.wait(timeout=30)
    rows = []
    for routed, (done, batches, cpu) in zip(variants, windows, strict=True):
        mean_batch = done / batches if batches else 0.0
        forward = _forward_us(model, engine_name, options.threads, max(round(mean_batch), 1))
        rows.append(Row(model.name, engine_name, 3 if routed else 2, options.callers,
                        options.inflight, done / options.seconds, cpu / options.seconds,
                        cpu / max(done, 1) * 1e6, mean_batch, forward))  # fmt: skip
    return rows


def _us(value: float | None) -> str:
    return "within the forward's noise" if value is None else f"{value:.0f}"


def document(rows: list[Row], options: argparse.Namespace) -> str:
    table = markdown_table(
        ["model", "engine", "calls", "requests/s", "model process cores", "CPU us per request",
         "mean batch", "forward us per image", "own work us per request"],
        [[r.model, r.engine, str(r.calls), f"{r.requests_per_s:.0f}", f"{r.model_cores:.2f}",
          f"{r.model_us_per_request:.0f}", f"{r.mean_batch:.1f}",
          f"{r.forward_us_per_image:.0f}", _us(r.own_us_per_request)] for r in rows],
    )  # fmt: skip
    ceilings = "\n".join(
        f"- {r.model}: one core of this machine does the model process's own work for "
        f"{1e6 / r.own_us_per_request:.0f} requests/s"
        for r in rows
        if r.own_us_per_request is not None
    )
    return (
        f"# The model process alone\n\n{options.callers} caller processes x {options.inflight} "
        f"requests in flight (calls: per request, as a front worker makes them for the model's "
        f"benchmark image), {options.seconds:.0f} s, "
        f"CONVSERVE_THREADS={options.threads}; {os.cpu_count()} cores, shared with the callers."
        f"\n\n{table}\n\n{ceilings}\n"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--caller":
        caller_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"],
                        choices=["digits", "seed", "resnet18"])  # fmt: skip
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--callers", type=int, default=2, help="processes, as front workers")
    parser.add_argument("--inflight", type=int, default=16, help="requests each keeps going")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in prepare_models(Path(folder), options.models, options.threads):
            for row in measure(model, options, Path(folder)):
                rows.append(row)
                print(f"  {row.model}, {row.calls} calls: {row.requests_per_s:.0f} req/s, model "
                      f"process {row.model_us_per_request:.0f} us CPU per request (forward "
                      f"{row.forward_us_per_image:.0f}), mean batch {row.mean_batch:.1f}",
                      flush=True)  # fmt: skip
    text = document(rows, options)
    payload = {
        "options": vars(options),
        "rows": [asdict(r) | {"own_us_per_request": r.own_us_per_request} for r in rows],
    }
    path = write_results("model_process", payload, text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
