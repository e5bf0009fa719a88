"""Supervisor: `convserve serve` starts, watches and stops the model process and the workers.

    supervisor ── model process (python -m service.modelhost): catalog, batchers, torch
               ├─ front worker 1 (python -m service.front): HTTP, decoding, no torch
               └─ front worker N            ... all on the one listening socket

It binds the listening socket once and hands it to every worker, with the settings on each
child's command line: nothing travels through the environment but prometheus-client's own
PROMETHEUS_MULTIPROC_DIR, so /metrics from any worker sums every process. The supervisor owns
the signals. The first SIGTERM or Ctrl-C goes to the workers: each reports not ready, answers
new predictions with 503 and `Connection: close`, finishes every admitted request (the model
process keeps serving them) and exits; then the model process is stopped and the supervisor
exits 0. A second signal asks the workers to stop without the drain delay; a third kills
everything. A worker that dies otherwise is replaced; so is the model process, whose loss the
workers answer with 503 until its replacement has loaded and warmed up.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess

from service.config import Settings

log = logging.getLogger("convserve.supervisor")
TICK_S = 0.1
RESTART_BACKOFF_S = 1.0  # a child that dies at start-up is not restarted in a hot loop
MODEL_STOP_S = 30.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(eq=False)
class Child:
    role: str  # "worker" or "model process"
    process: subprocess.Popen[bytes]
    started: float


def _end_with_parent() -> None:
    """In the child, before exec: a SIGTERM when the supervisor dies, even by SIGKILL, so no
    worker keeps serving (or a model process keeps its memory) without anyone watching."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = Path(tempfile.mkdtemp(prefix="convserve-"))
        self.socket_path = self.home / "models.sock"
        # prometheus-client's multiprocess mode: the one you set, else a fresh one of ours
        chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.metrics_dir = Path(chosen) if chosen else self.home / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[Child | None] = [None] * settings.workers
        self.models: Child | None = None
        self.signals = 0
        self.listener: socket.socket | None = None
        self.failed = False

    def run(self) -> int:
        self.listener = socket.create_server(
            (self.settings.host, self.settings.port), backlog=4096, reuse_port=False
        )
        if not self._grpc_port_free():
            self.listener.close()
            shutil.rmtree(self.home, ignore_errors=True)
            return 1
        self.listener.set_inheritable(True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.models = self._start_models()
        for index in range(self.settings.workers):
            self.workers[index] = self._start_worker(wait_for_models=False)
        log.info(
            "supervisor %d: %d workers and a model process on http://%s:%d",
            os.getpid(),
            self.settings.workers,
            self.settings.host,
            self.settings.port,
        )
        try:
            while any(self.workers):
                time.sleep(TICK_S)
                self._watch_workers()
                self._watch_models()
            self._stop_models()
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
        return 1 if self.failed else 0

    def _grpc_port_free(self) -> bool:
        """Every worker binds CONVSERVE_GRPC_PORT itself, with SO_REUSEPORT. A port taken stops
        start-up here, once, instead of failing every worker again and again; probed without
        SO_REUSEPORT, so another server of this user holding it (which the workers could
        join unnoticed) counts as taken."""
        if self.settings.grpc_port == 0:
            return True
        address = (self.settings.host, self.settings.grpc_port)
        try:
            socket.create_server(address, reuse_port=False).close()
        except OSError as exc:
            log.error("cannot serve gRPC on %s:%d (CONVSERVE_GRPC_PORT): %s", *address, exc)
            return False
        return True

    def _command(self, module: str, *args: str) -> list[str]:
        settings = json.dumps(self.settings.to_env())
        return [sys.executable, "-m", module, settings, *args]

    def _spawn(self, role: str, command: list[str], pass_fds: tuple[int, ...] = ()) -> Child:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        process = subprocess.Popen(
            command,
            pass_fds=pass_fds,
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_end_with_parent,  # safe: the supervisor has one thread
        )
        return Child(role, process, time.monotonic())

    def _start_models(self) -> Child:
        return self._spawn(
            "model process", self._command("service.modelhost", str(self.socket_path))
        )

    def _start_worker(self, *, wait_for_models: bool) -> Child:
        assert self.listener is not None
        fd = self.listener.fileno()
        command = self._command(
            "service.front", str(fd), str(self.socket_path), "1" if wait_for_models else "0"
        )
        return self._spawn("worker", command, (fd,))

    def _ended(self, child: Child) -> int:
        code = child.process.returncode
        # its live gauges (queue depth, in flight) leave the sum
        multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
            child.process.pid, str(self.metrics_dir)
        )
        if self.signals:
            self.failed = self.failed or code != 0
            log.info("%s %d exited (%d)", child.role, child.process.pid, code)
        else:
            log.error("%s %d died (exit %d); starting another", child.role, child.process.pid, code)
            if time.monotonic() - child.started < RESTART_BACKOFF_S:
                time.sleep(RESTART_BACKOFF_S)
        return code

    def _watch_workers(self) -> None:
        for index, worker in enumerate(self.workers):
            if worker is None or worker.process.poll() is None:
                continue
            self._ended(worker)
            self.workers[index] = None
            if not self.signals:
                self.workers[index] = self._start_worker(wait_for_models=True)

    def _watch_models(self) -> None:
        if self.models is None or self.models.process.poll() is None:
            return
        self._ended(self.models)
        self.models = None
        if not self.signals:
            self.models = self._start_models()
        # while draining the workers answer the rest with 503; nothing restarts it

    def _stop_models(self) -> None:
        """After the workers: the model process finished what they sent it."""
        if self.models is None:
            return
        process = self.models.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(MODEL_STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._ended(self.models)
        self.models = None

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.listener is not None:
            # the workers hold their own copies; ours would keep accepting into the backlog
            # after they closed theirs, and nobody would answer
            self.listener.close()
            self.listener = None
        forward = signal.SIGTERM if self.signals < 3 else signal.SIGKILL
        log.info("signal %d: %s the workers", sig, "draining" if self.signals == 1 else "stopping")
        for worker in self.workers:
            if worker is not None and worker.process.poll() is None:
                worker.process.send_signal(forward)
        if self.signals >= 3 and self.models is not None and self.models.process.poll() is None:
            self.models.process.kill()
