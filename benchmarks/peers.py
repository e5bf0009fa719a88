"""Peer model servers for issue 8: the servers users would pick instead of convserve.

    .venv/bin/python -m benchmarks.peers setup [NAME ...]   # create the peer venvs (once)
    .venv/bin/python -m benchmarks.peers check [NAME ...] [--threads N]   # on `digits`

Each peer lives in its own virtual environment under benchmarks/.peers/<name>/venv, installed
from the package registries (torch and torchvision from this machine's wheel folders, the same
releases convserve runs), and serves the same weights and preprocessing as convserve: the app
loads a store version folder with `service.network.load_classifier` and prepares each image with
`service.imaging.prepare_image` (benchmarks/peers/peer_model.py). `service` reaches a peer venv
as an editable install of this repository without its dependencies.

Every peer answers `POST <url>` with a raw image body (Content-Type: image/jpeg) with JSON
`{"predictions": [{label, class_index, probability} x5], "batch_size": n, "threads": t}`
(BentoML: a list holding that one object, as its batchable APIs answer), one image per
request, batched by the peer's own batching. One inference worker per peer; its torch thread
count is set from `threads`. The peer's model writes `convserve-peer threads=N` once loaded and
`convserve-peer batch=N` per batch to RunningPeer.events; a driver reads the mean batch size of
a run from the slice of batch_sizes() the run added, and CPU use from cpu_seconds() before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "peers"
PEERS_DIR = Path(__file__).resolve().parent / ".peers"
EXAMPLE = ROOT / "docs" / "examples" / "digit-4.jpg"
DIGITS = ROOT / "model_store" / "digits" / "1"

# What convserve's own venv runs, so preprocessing and the forward pass cost the same.
COMMON = (
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "msgspec==0.22.0",
    "safetensors==0.8.0",
    "onnx==1.23.2",  # service.network reads a prepared store's graph cards with it
)
THREADS_LINE = re.compile(rb"convserve-peer threads=(\d+)")
BATCH_LINE = re.compile(rb"convserve-peer batch=(\d+)")


def _quiet_env(threads: int) -> dict[str, str]:
    """Environment of a peer process: unbuffered output, thread caps, no telemetry."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("VIRTUAL_ENV")}
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PEER_THREADS=str(threads),
        BENTOML_DO_NOT_TRACK="true",
        DO_NOT_TRACK="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


@dataclass
class RunningPeer:
    """One peer server process (and its process group) on 127.0.0.1."""

    name: str
    url: str  # full predict URL: POST a raw image body here
    ready_url: str  # GET answers 200 once the model serves
    process: subprocess.Popen[bytes]
    log: Path  # the peer's stdout and stderr
    events: Path  # threads= and batch= lines the peer's PeerModel writes
    started: float = field(default_factory=time.perf_counter)
    settings: dict[str, Any] = field(default_factory=dict)  # the knobs it was started with

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds from process start until the model loaded and the readiness URL said 200."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log}:\n"
                    + self.log_tail()
                )
            if self.threads() is not None:  # PeerModel loaded and warmed up
                try:
                    with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - self.started
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")

    def threads(self) -> int | None:
        """The torch thread count the peer's inference process reported, None if not yet."""
        found = THREADS_LINE.findall(self._read(self.events))
        return int(found[-1]) if found else None

    def batch_sizes(self) -> list[int]:
        """Size of every batch the peer ran so far (warm-up batches excluded)."""
        return [int(size) for size in BATCH_LINE.findall(self._read(self.events))]

    def log_tail(self, lines: int = 40) -> str:
        text = self._read(self.log).decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""

    def pids(self) -> list[int]:
        """Live processes of the peer: its process group (server, workers, the JVM)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.process.pid:  # field 5 of stat: the process group
                found.append(int(stat.parent.name))
        return found

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the peer's live processes and their reaped children used.

        Read it before and after a load run: the difference is the peer's CPU use.
        """
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        return total / ticks

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM the whole process group (workers included), SIGKILL what is left, of the
        group and of the process tree. Returns how many had left the group."""
        return stop_group(self.process, timeout)

    def __enter__(self) -> RunningPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Peer:
    """A peer server: its venv (created once) and how to start it on a model folder."""

    name: str
    framework: tuple[str, ...]  # pip requirements of the server itself, pinned
    batching: str  # how max_batch_size / max_delay_ms map onto the peer's knobs
    app: str  # its launcher in benchmarks/peers/
    predict_path: str
    ready_path: str

    @property
    def home(self) -> Path:
        return PEERS_DIR / self.name

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.venv / ".installed"

    def requirements(self) -> list[str]:
        return [*self.framework, *COMMON]

    def setup(self) -> Path:
        """Create the venv and install the peer (once: a stamp records what was installed)."""
        wanted = json.dumps({"requirements": self.requirements(), "repo": str(ROOT)})
        if self.stamp.is_file() and self.stamp.read_text() == wanted:
            return self.venv
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        # -qq: errors only (pip warns for every name the local wheel indexes lack)
        pip = [str(self.python), "-m", "pip", "install", "-qq", "--disable-pip-version-check"]
        subprocess.run([*pip, *self.requirements()], check=True)
        # convserve's model loading and preprocessing, not its server or dependencies
        subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
        self.stamp.write_text(wanted)
        return self.venv

    def versions(self) -> dict[str, str]:
        """Installed versions of the framework and torch in the peer venv."""
        names = [re.split(r"[=<>\[]", req)[0] for req in (*self.framework, "torch", "torchvision")]
        script = (
            "import importlib.metadata as m, json, sys\n"
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
        )
        out = subprocess.run(
            [str(self.python), "-c", script, *names], check=True, capture_output=True, text=True
        )
        result: dict[str, str] = json.loads(out.stdout)
        return result

    def start(
        self,
        model_dir: Path,
        port: int,
        threads: int,
        max_batch_size: int = 32,
        max_delay_ms: float = 5.0,
    ) -> RunningPeer:
        """Start the peer serving `model_dir` (a store version folder) on 127.0.0.1:port."""
        if not self.stamp.is_file():
            raise RuntimeError(f"{self.name}: no venv yet; run setup() first")
        model_dir = model_dir.resolve()
        run = self.home / "run"
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        log = run / "peer.log"
        events = run / "events.log"
        command, url, ready = self.command(
            model_dir, port, threads, max_batch_size, max_delay_ms, run
        )
        env = _quiet_env(threads) | self.environment()
        env["PEER_EVENTS"] = str(events)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        launched = time.perf_counter()  # as Server.started: just before the process starts
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command,
                cwd=run,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends every worker
            )
        settings = {"threads": threads, "max_batch_size": max_batch_size,
                    "max_delay_ms": max_delay_ms, "batching": self.batching}  # fmt: skip
        return RunningPeer(
            self.name, url, ready, process, log, events, started=launched, settings=settings
        )

    def app_args(
        self, model_dir: Path, port: int, threads: int, max_batch_size: int, max_delay_ms: float
    ) -> list[str]:
        return [
            "--model-dir", str(model_dir), "--port", str(port), "--threads", str(threads),
            "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms),
        ]  # fmt: skip

    def command(
        self,
        model_dir: Path,
        port: int,
        threads: int,
        max_batch_size: int,
        max_delay_ms: float,
        run: Path,
    ) -> tuple[list[str], str, str]:
        """The command line, the predict URL and the readiness URL."""
        args = self.app_args(model_dir, port, threads, max_batch_size, max_delay_ms)
        base = f"http://127.0.0.1:{port}"
        return (
            [str(self.python), str(APPS / self.app), *args, *self.extra_args(run)],
            base + self.predict_path,
            base + self.ready_path,
        )

    def extra_args(self, run: Path) -> list[str]:
        """Arguments only this peer's launcher takes."""
        return []

    def environment(self) -> dict[str, str]:
        """Variables only this peer reads (those read when its package is imported: the app
        would set them too late)."""
        return {}


class LitServe(Peer):
    name = "litserve"
    framework = ("litserve==0.2.19",)
    batching = (
        "LitAPI(max_batch_size=32, batch_timeout=max_delay_ms/1000): the worker collects "
        "requests for up to batch_timeout (counted from when it starts collecting, polling its "
        "queue every 1 ms) or until the batch is full; one inference worker "
        "(workers_per_device=1), one API server process, fast_queue off (ZeroMQ measured no "
        "faster on 2 cores)"
    )
    app, predict_path, ready_path = "litserve_app.py", "/predict", "/health"


class BentoML(Peer):
    name = "bentoml"
    framework = ("bentoml==1.4.40",)
    batching = (
        "@bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=60000): BentoML's "
        "adaptive batching picks the wait itself (no fixed delay knob; max_latency_ms is a "
        "deadline after which requests are rejected, set high so none are); one worker"
    )
    app, predict_path, ready_path = "bentoml_app.py", "/predict", "/readyz"


class TorchServe(Peer):
    name = "torchserve"
    # ts/utils/util.py imports yaml, which torchserve does not declare
    framework = ("torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml==6.0.4")
    batching = (
        "model config batchSize=32, maxBatchDelay=round(max_delay_ms) (whole ms, at least 1): "
        "once a job is taken the frontend waits up to maxBatchDelay for the batch to fill; one "
        "worker (minWorkers=maxWorkers=1); log4j cut to warnings"
    )
    app, predict_path, ready_path = "torchserve_launch.py", "/predictions/peer", "/ping"

    def extra_args(self, run: Path) -> list[str]:
        return ["--run-dir", str(run)]


class RayServe(Peer):
    name = "rayserve"
    framework = ("ray[serve]>=2.58,<2.61",)
    batching = (
        "@serve.batch(max_batch_size=32, batch_wait_timeout_s=max_delay_ms/1000): the replica "
        "waits up to batch_wait_timeout_s from the first queued request or until the batch is "
        "full; one replica (num_replicas=1) with max_ongoing_requests=1000 (Serve's default of "
        "5 would cap every batch at 5); a private local Ray cluster, no dashboard"
    )
    app, predict_path, ready_path = "rayserve_app.py", "/predict", "/-/healthz"

    def environment(self) -> dict[str, str]:
        return {
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray 2.60 turns token authentication on for a new local cluster and writes the
            # token into ~/.ray; this cluster is on 127.0.0.1 and lives as long as the run.
            "RAY_AUTH_MODE": "disabled",
            # Every Ray process on 127.0.0.1: Ray swaps a loopback node address for the
            # machine's interface address unless this switch (named for laptops) is off.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Ray's crash handler would take SIGTERM over from Python and end the app at once,
            # skipping its ray.shutdown() and the removal of its temp folder.
            "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
        }


PEERS: dict[str, Peer] = {
    peer.name: peer for peer in (LitServe(), BentoML(), TorchServe(), RayServe())
}


def post_image(url: str, body: bytes) -> dict[str, Any]:
    """POST a raw JPEG body; the one answer (BentoML's list unwrapped). Raises on non-200."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        result = json.loads(response.read())
    # BentoML's batchable APIs answer each request with a list (here of one result)
    answer: dict[str, Any] = result[0] if isinstance(result, list) else result
    return answer


def reference(model_dir: Path, body: bytes) -> list[float]:
    """convserve's own probabilities for `body`, in process: what every peer must answer."""
    import numpy as np
    import torch

    from service.config import Settings
    from service.imaging import DecodeLimits, prepare_image
    from service.network import load_classifier

    classifier = load_classifier(
        model_dir, model_dir.parent.name, int(model_dir.name), torch.device("cpu")
    )
    array = prepare_image(body, classifier.spec.input, DecodeLimits.from_settings(Settings())).array
    with torch.inference_mode():
        logits = classifier.module(torch.from_numpy(np.stack([array])))
        row = torch.softmax(logits.float(), dim=1)[0]
    return [float(value) for value in row]


def check(peer: Peer, concurrent: int = 32, threads: int = 1) -> dict[str, Any]:
    """Serve `digits`, classify digit-4.jpg, then `concurrent` requests at once."""
    body = EXAMPLE.read_bytes()
    expected = reference(DIGITS, body)
    with peer.start(DIGITS, free_port(), threads=threads) as running:
        ready_s = running.wait_ready()
        single = post_image(running.url, body)
        top = single["predictions"][0]
        with ThreadPoolExecutor(concurrent) as pool:
            burst = list(pool.map(lambda _: post_image(running.url, body), range(concurrent)))
        tops = {answer["predictions"][0]["label"] for answer in burst}
        sizes = running.batch_sizes()
        cpu_s = running.cpu_seconds()
        used = running.threads()
    deviation = max(
        abs(p["probability"] - expected[p["class_index"]]) for p in single["predictions"]
    )
    return {
        "peer": peer.name,
        "versions": peer.versions(),
        "ready_s": round(ready_s, 2),
        "top": top["label"],
        "probability": round(top["probability"], 4),
        "top5": [p["label"] for p in single["predictions"]],
        "max_deviation_from_convserve": deviation,
        "threads": used,
        "burst_ok": len(burst) == concurrent and tops == {"4"},
        "batch_sizes": sizes,  # the single request, then the burst
        "cpu_s": round(cpu_s, 2),
        "batching": peer.batching,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["setup", "check"])
    parser.add_argument("names", nargs="*", help=f"peers (default: all of {', '.join(PEERS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (check)")
    options = parser.parse_args(argv)
    names = options.names or list(PEERS)
    failed = False
    for name in names:
        peer = PEERS[name]
        started = time.perf_counter()
        peer.setup()
        print(f"{name}: venv ready in {time.perf_counter() - started:.0f} s", flush=True)
        if options.action == "check":
            result = check(peer, threads=options.threads)
            print(json.dumps(result), flush=True)
            good = (
                result["top"] == "4"
                and result["burst_ok"]
                and result["threads"] == options.threads
                and result["max_deviation_from_convserve"] < 1e-5
                and max(result["batch_sizes"]) > 1
            )
            failed |= not good
            verdict = "OK" if good else "FAILED"
            print(
                f"{name}: {verdict}: top {result['top']} p={result['probability']}, threads "
                f"{result['threads']}, largest batch {max(result['batch_sizes'])}, "
                f"ready in {result['ready_s']} s",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
