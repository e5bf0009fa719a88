"""Shared benchmark plumbing: timing, machine facts, result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from service.engines import Engine

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median and p90 wall time of `fn` in milliseconds (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000.0)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p90_ms": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        "repeats": repeats,
    }


def forward(engine: Engine, arrays: Sequence[np.ndarray]) -> None:
    """The model half of the in-process limit: one forward pass over the (C, H, W) arrays as
    one batch, softmax, top-5."""
    logits = engine.logits(np.stack(arrays))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    np.argsort(-probabilities, axis=1)[:, :5]


def median_seconds(fn: Callable[[], object], seconds: float = 4.0, at_least: int = 3) -> float:
    """Median wall time of `fn` over `seconds` of calls (at least `at_least`), after one untimed
    call: how the in-process limit is timed."""
    fn()
    times: list[float] = []
    budget = time.perf_counter() + seconds
    while time.perf_counter() < budget or len(times) < at_least:
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_results(name: str, payload: dict[str, Any], table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Verdicts:
    """Targets and whether a run met them: a markdown table for people, records for JSON."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.records: list[dict[str, Any]] = []

    def add(self, goal: str, measured: str, required: str, met: bool) -> None:
        self.rows.append([goal, measured, required, "met" if met else "NOT met"])
        self.records.append({"goal": goal, "measured": measured, "required": required, "met": met})

    def table(self) -> str:
        return markdown_table(["target", "measured", "required", "verdict"], self.rows)


def process_tree(pid: int) -> list[int]:
    """A process and all its live descendants (uvicorn workers, a peer's workers, a JVM)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = task.read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat, which tells a process from a later one given its pid;
    None once it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group `pgid` is still alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(
    process: subprocess.Popen[bytes], timeout: float, *, whole_group: bool = True
) -> int:
    """End a process started with `start_new_session=True`, its group and its descendants.

    SIGTERM the group (or, with whole_group=False, only its leader, which then stops its own
    workers), wait up to `timeout` for every member to exit, then SIGKILL what is left: the
    group, and any process of its tree (as it was before the stop) that left the group (Ray's
    workers do). Returns how many of those strays there were.
    """
    if process.poll() is not None and not group_alive(process.pid):
        return 0  # stopped before: its pid may be another process's by now
    tree = {pid: _start_time(pid) for pid in process_tree(process.pid)}
    with contextlib.suppress(ProcessLookupError):
        if whole_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
    deadline = time.perf_counter() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while group_alive(process.pid) and time.perf_counter() < deadline:
        time.sleep(0.05)  # workers (and a JVM) shut down after the leader
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers
    process.wait()
    strays = [pid for pid, began in tree.items() if began and _start_time(pid) == began]
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.perf_counter() + 5.0
    while any(_start_time(pid) for pid in strays) and time.perf_counter() < deadline:
        time.sleep(0.05)
    return len(strays)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`convserve serve` (or any command) as a separate process on a free port. Its response
    cache is off unless `env` turns it on: the loads send the same photo again and again, and
    what they measure is answering it (peers have no such cache; benchmarks.cache measures it)."""

    def __init__(
        self, env: dict[str, str], command: list[str] | None = None, cwd: Path | None = None
    ) -> None:
        """`cwd`: where `python -m service` resolves `service` first (another checkout)."""
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, "CONVSERVE_PORT": str(self.port), "CONVSERVE_LOG_LEVEL": "warning",
                   "CONVSERVE_GRPC_PORT": str(free_port()), "CONVSERVE_CACHE_ENTRIES": "0",
                   **env}  # fmt: skip
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command or [sys.executable, "-m", "service", "serve"],
            env=environ,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() ends every worker
        )

    def wait_ready(self, path: str = "/health/ready", timeout: float = 300.0) -> float:
        """Seconds from process start until `path` answered 200. One client for every poll: a
        new one each time (httpx.get) loads a TLS context, CPU the starting server lacks."""
        import httpx

        deadline = time.perf_counter() + timeout
        with httpx.Client(base_url=self.url, timeout=1) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}")
                try:
                    if client.get(path).status_code == 200:
                        return time.perf_counter() - self.started
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
        raise TimeoutError(f"{self.url} not ready")

    def stop(self) -> int:
        """SIGTERM the server (it drains and stops its workers); after 30 s at most, SIGKILL
        what is left of its process group and tree. Returns how many had left the group."""
        return stop_group(self.process, 30.0, whole_group=False)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
