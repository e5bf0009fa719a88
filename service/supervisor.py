"""Supervisor: with CONVSERVE_WORKERS above 1, `convserve serve` starts, watches and stops them.

It binds the listening socket once and hands it to every worker (`python -m service.worker`),
with the settings on the worker's command line: nothing travels through the environment but
prometheus-client's own PROMETHEUS_MULTIPROC_DIR. Each worker is a whole server that drains on
SIGTERM exactly as a single process does. The supervisor owns the signals: the first SIGTERM
or Ctrl-C goes to every worker, so all of them report not ready, answer new predictions with
503 and `Connection: close`, finish every admitted request and exit; the supervisor then exits
0. A second signal asks them to stop without the drain delay; a third kills them. A worker that
dies otherwise (a crash, the OOM killer, SIGKILL) is replaced and the others keep serving.
"""

from __future__ import annotations

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
RESTART_BACKOFF_S = 1.0  # a worker that dies at start-up is not restarted in a hot loop


@dataclass(eq=False)
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # prometheus-client's multiprocess mode: the one you set, else a fresh one of ours
        chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.own_metrics_dir = not chosen
        self.metrics_dir = Path(chosen or tempfile.mkdtemp(prefix="convserve-metrics-"))
        self.workers: list[Worker | None] = [None] * settings.workers
        self.signals = 0
        self.listener: socket.socket | None = None

    def run(self) -> int:
        self.listener = socket.create_server(
            (self.settings.host, self.settings.port), backlog=4096, reuse_port=False
        )
        self.listener.set_inheritable(True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for index in range(self.settings.workers):
            self._start(index)
        log.info(
            "supervisor %d: %d workers on http://%s:%d",
            os.getpid(),
            self.settings.workers,
            self.settings.host,
            self.settings.port,
        )
        failed = False
        while any(self.workers):
            time.sleep(TICK_S)
            for index, worker in enumerate(self.workers):
                if worker is None or worker.process.poll() is None:
                    continue
                code = worker.process.returncode
                # its live gauges (queue depth, in flight) leave the sum
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    worker.process.pid, str(self.metrics_dir)
                )
                self.workers[index] = None
                if self.signals:
                    failed = failed or code != 0
                    log.info("worker %d exited (%d)", worker.process.pid, code)
                    continue
                log.error("worker %d died (exit %d); starting another", worker.process.pid, code)
                if time.monotonic() - worker.started < RESTART_BACKOFF_S:
                    time.sleep(RESTART_BACKOFF_S)
                self._start(index)
        if self.own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return 1 if failed else 0

    def _start(self, index: int) -> None:
        assert self.listener is not None
        fd = self.listener.fileno()
        settings = json.dumps(self.settings.to_env())
        command = [sys.executable, "-m", "service.worker", settings, str(fd)]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        process = subprocess.Popen(command, pass_fds=[fd], env=env, stdin=subprocess.DEVNULL)
        self.workers[index] = Worker(index, process, time.monotonic())

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
