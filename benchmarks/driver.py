"""`make bench`: convserve against the in-process limit, a naive server and peer servers.

    .venv/bin/python -m benchmarks.driver [--models digits seed resnet18]
        [--targets convserve convserve-torch naive litserve bentoml torchserve]
        [--concurrency 1 8 32 64] [--duration 8]

One run, one machine, one target at a time. For each model:
  1. the in-process limit: decode + preprocess + forward + softmax/top-k with no HTTP, at batch
     1, 8 and 32, with eager torch and with ONNX Runtime (the limit is the faster);
  2. each server under `hey` (a closed-loop load generator in its own process) at each client
     count: requests/s, p50/p90/p99, errors, mean batch size, CPU use (cores);
  3. convserve's cold start (process start to ready) and the heatmap/plain batch ratio.
Writes benchmarks/results/bench.json and bench.md, and plots to docs/images/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from benchmarks.common import (
    RESULTS,
    Server,
    Verdicts,
    forward,
    free_port,
    machine,
    markdown_table,
    median_seconds,
    process_tree,
    write_results,
)
from benchmarks.heatmaps import full_backward_grad_cam
from benchmarks.peers import PEERS, RunningPeer
from service.classifier import Classifier
from service.config import default_cache
from service.engines import Engine, OnnxEngine
from service.imaging import DecodeLimits, prepare_image
from service.store import ModelStore
from service.torch_engine import ensure_onnx

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
CPU = torch.device("cpu")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Model:
    name: str
    store: Path
    body: bytes  # the JPEG every request sends
    note: str


@dataclass
class LoadResult:
    target: str
    model: str
    clients: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None
    cpu_cores: float
    threads: int | None


@dataclass
class Report:
    machine: dict[str, Any]
    inprocess: list[dict[str, Any]] = field(default_factory=list)
    load: list[LoadResult] = field(default_factory=list)
    cold_start_s: list[float] = field(default_factory=list)
    heatmap: list[dict[str, Any]] = field(default_factory=list)


# ---- inputs ---------------------------------------------------------------------------------


def photo() -> bytes:
    """A real photo (scikit-image's chelsea the cat), re-encoded as a 640x480 JPEG."""
    from skimage import data

    out = io.BytesIO()
    cat = data.chelsea()  # type: ignore[no-untyped-call]  # scikit-image has no annotations here
    Image.fromarray(cat).resize((640, 480)).save(out, "JPEG", quality=90)
    return out.getvalue()


def prepare_models(workdir: Path, names: list[str], threads: int) -> list[Model]:
    """The stores the servers load. The random-init ones are written by `convserve import`, as
    a user would, which also records the engine decision for `threads` in the user's cache:
    each import's model.json is new (it records the time), so without that the first server
    of a run would measure its engines and load torch, and its memory row would show it."""
    picture = photo()
    models = []
    for name in names:
        if name == "digits":
            body = (ROOT / "docs" / "examples" / "digit-4.jpg").read_bytes()
            models.append(Model("digits", ROOT / "model_store", body, "bundled, 1x28x28"))
        elif name == "seed":
            store = imported(workdir / "seed", threads, "small_cnn", "--name", "seed",
                             "--input", "3x32x32", "--classes", "10")  # fmt: skip
            models.append(Model("seed", store, picture, "seed SmallCNN, 3x32x32, random init"))
        elif name == "resnet18":
            store = imported(workdir / "resnet18", threads, "resnet18")
            models.append(Model("resnet18", store, picture, "resnet18, random init, 224x224"))
    return models


def imported(store: Path, threads: int, *arguments: str) -> Path:
    """`convserve import ARGUMENTS --random-init` into a new store (seeded: the same weights
    every run)."""
    env = {**os.environ, "CONVSERVE_STORE": str(store), "CONVSERVE_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "service", "import", *arguments, "--random-init"],
                   env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return store


# ---- the in-process limit -------------------------------------------------------------------


def pipeline(classifier: Classifier, engine: Engine, body: bytes, size: int) -> None:
    """Decode + preprocess `size` images, one forward pass, softmax, top-5."""
    arrays = [
        prepare_image(body, classifier.spec.input, DecodeLimits(40_000_000)).array
        for _ in range(size)
    ]
    forward(engine, arrays)


def inprocess(model: Model, report: Report, sizes: tuple[int, ...] = (1, 8, 32)) -> None:
    """Both engines at each batch size in `sizes`, 4 s each (a caller needing batch 1 only
    saves the rest)."""
    store = ModelStore(model.store)
    classifier = store.load(model.name, 1, CPU)
    folder = store.path(model.name, 1)
    onnx = OnnxEngine(ensure_onnx(classifier.module, classifier.input_shape, folder,
                                  classifier.spec.sha256, default_cache()), None)  # fmt: skip
    for engine in (classifier.torch_engine, onnx):
        for size in sizes:
            median = median_seconds(partial(pipeline, classifier, engine, model.body, size))
            row = {"model": model.name, "engine": engine.name, "batch": size,
                   "batch_ms": median * 1000, "images_per_s": size / median,
                   "threads": torch.get_num_threads()}  # fmt: skip
            report.inprocess.append(row)
            print(
                f"  in-process {model.name} {engine.name} batch {size}: "
                f"{row['images_per_s']:.1f} img/s, {row['batch_ms']:.2f} ms/batch",
                flush=True,
            )


# ---- servers --------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU time (user + system) of one process, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process tree."""
    return sum(process_cpu(member) for member in process_tree(pid))


def pause(pid: int, paused: bool) -> None:
    """SIGSTOP / SIGCONT a whole process tree: an idle server polling its queues (LitServe
    spends 0.07 cores doing nothing) must not take CPU from the one being measured."""
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGSTOP if paused else signal.SIGCONT)


HEY = re.compile(r"Requests/sec:\s+([\d.]+)")
PERCENTILE = re.compile(r"(\d+)% in ([\d.]+) secs")
STATUS = re.compile(r"\[(\d+)\]\s+(\d+) responses")


def hey(url: str, body_file: Path, clients: int, seconds: float) -> dict[str, Any]:
    command = ["hey", "-z", f"{seconds}s", "-c", str(clients), "-m", "POST", "-T", "image/jpeg",
               "-D", str(body_file), url]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = HEY.search(output)
    percentiles = {int(p): float(s) * 1000 for p, s in PERCENTILE.findall(output)}
    statuses = {int(code): int(count) for code, count in STATUS.findall(output)}
    errors = sum(n for code, n in statuses.items() if code != 200)
    errors += sum(int(n) for n in re.findall(r"^\s+\[(\d+)\]\s+(?:Post|Get)", output, re.M))
    return {"rate": float(rate[1]) if rate else 0.0, "p50": percentiles.get(50, float("nan")),
            "p90": percentiles.get(90, float("nan")), "p99": percentiles.get(99, float("nan")),
            "errors": errors, "raw": output}  # fmt: skip


def batch_totals(url: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    images = batches = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "convserve_batch_size_sum":
                images += sample.value
            elif sample.name == "convserve_batch_size_count":
                batches += sample.value
    return images, batches


class Target:
    """A server under test: start, the predict URL, CPU time, batch sizes, stop."""

    def __init__(self, name: str, model: Model, threads: int, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:  # fmt: skip
        """`env` and `cwd` (a checkout to run `python -m service` from) vary a convserve server
        beyond the named targets, e.g. its worker count or another commit's code."""
        self.name, self.model, self.threads = name, model, threads
        self.env, self.cwd = env or {}, cwd
        self.peer: RunningPeer | None = None
        self.server: Server | None = None
        self.url = ""
        self.ready_url = ""
        self.thread_count: int | None = threads

    def launch(self) -> None:
        """Start the server without waiting for it: `url` and `ready_url` are set, `started`
        is its launch time."""
        env = {"CONVSERVE_STORE": str(self.model.store), "CONVSERVE_MODELS": self.model.name,
               "CONVSERVE_THREADS": str(self.threads)}  # fmt: skip
        if self.name in PEERS:
            folder = self.model.store / self.model.name / "1"
            self.peer = PEERS[self.name].start(folder, free_port(), self.threads)
            self.url, self.ready_url = self.peer.url, self.peer.ready_url
            return
        if self.name == "naive":
            env |= {"NAIVE_MODEL": self.model.name, "NAIVE_THREADS": str(self.threads)}
            self.server = Server(env, [sys.executable, "-m", "benchmarks.naive_server"])
            self.url, self.ready_url = f"{self.server.url}/predict", f"{self.server.url}/ready"
            return
        if self.name == "convserve-torch":
            env["CONVSERVE_ENGINE"] = "torch"
        if self.name == "convserve-2w":
            env["CONVSERVE_WORKERS"] = "2"
        self.server = Server(env | self.env, cwd=self.cwd)
        self.url = f"{self.server.url}/models/{self.model.name}/predict"
        self.ready_url = f"{self.server.url}/health/ready"

    def start(self) -> None:
        """Launch the server and wait until it is ready."""
        self.launch()
        if self.peer is not None:
            self.peer.wait_ready()
            self.thread_count = self.peer.threads()
        else:
            assert self.server is not None
            self.server.wait_ready(self.ready_url.removeprefix(self.server.url))

    @property
    def started(self) -> float:
        """time.perf_counter() when the server's process was launched."""
        if self.peer is not None:
            return self.peer.started
        assert self.server is not None
        return self.server.started

    @property
    def pid(self) -> int:
        if self.peer is not None:
            return self.peer.process.pid
        assert self.server is not None
        return self.server.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def batches(self) -> tuple[float, float] | None:
        if self.peer is not None:
            sizes = self.peer.batch_sizes()
            return float(sum(sizes)), float(len(sizes))
        if self.server is not None and self.name != "naive":  # a convserve server
            return batch_totals(self.server.url)
        return None

    def stop(self) -> int:
        """Stop the server; returns how many of its processes had left its process group."""
        if self.peer is not None:
            return self.peer.stop()
        if self.server is not None:
            return self.server.stop()
        return 0


@dataclass
class Sample:
    rate: float
    p50: float
    p90: float
    p99: float
    errors: int
    images: float | None
    passes: float | None
    cpu: float
    wall: float
    cpu_parts: dict[str, float] = field(default_factory=dict)  # CPU seconds of named parts


def measure(target: Target, body_file: Path, clients: int, seconds: float,
            parts: Callable[[], dict[str, float]] | None = None) -> Sample:  # fmt: skip
    """One `hey` run after a 1 s warm-up. `parts` reads the CPU seconds of parts of the server
    (its front workers, say): read in the same window as the whole tree's, so they compare."""
    hey(target.url, body_file, clients, 1.0)  # warm connections and batch sizes
    cpu_before, batches_before = target.cpu(), target.batches()
    parts_before = parts() if parts else {}
    started = time.perf_counter()
    result = hey(target.url, body_file, clients, seconds)
    wall = time.perf_counter() - started
    parts_after = parts() if parts else {}
    cpu_after, batches_after = target.cpu(), target.batches()
    images = passes = None
    if batches_before is not None and batches_after is not None:
        images = batches_after[0] - batches_before[0]
        passes = batches_after[1] - batches_before[1]
    spent = {name: parts_after.get(name, used) - used for name, used in parts_before.items()}
    return Sample(result["rate"], result["p50"], result["p90"], result["p99"], result["errors"],
                  images, passes, cpu_after - cpu_before, wall, spent)  # fmt: skip


def summarize(target: Target, clients: int, samples: list[Sample]) -> LoadResult:
    """Medians over the rounds (latency and rate), totals for errors and batch sizes."""
    images = [s.images for s in samples if s.images is not None]
    passes = [s.passes for s in samples if s.passes]
    return LoadResult(
        target=target.name,
        model=target.model.name,
        clients=clients,
        requests_per_s=statistics.median(s.rate for s in samples),
        p50_ms=statistics.median(s.p50 for s in samples),
        p90_ms=statistics.median(s.p90 for s in samples),
        p99_ms=statistics.median(s.p99 for s in samples),
        errors=sum(s.errors for s in samples),
        mean_batch=sum(images) / sum(passes) if passes else None,
        cpu_cores=sum(s.cpu for s in samples) / sum(s.wall for s in samples),
        threads=target.thread_count,
    )


def load_runs(targets: list[Target], body_file: Path, clients: list[int], seconds: float,
              rounds: int, report: Report) -> None:  # fmt: skip
    """Every target at every client count, in interleaved rounds: slow spells of a shared
    machine then hit all targets alike instead of whichever ran at the time."""
    samples: dict[tuple[str, int], list[Sample]] = {}
    for round_ in range(rounds):
        for target in targets:
            for other in targets:
                pause(other.pid, other is not target)
            for count in clients:
                sample = measure(target, body_file, count, seconds)
                samples.setdefault((target.name, count), []).append(sample)
                print(f"  round {round_ + 1} {target.name:16} {target.model.name:9} c={count:<3} "
                      f"{sample.rate:8.1f} req/s  p50 {sample.p50:7.1f}  p99 {sample.p99:7.1f} ms",
                      flush=True)  # fmt: skip
    for target in targets:
        pause(target.pid, False)
    for target in targets:
        for count in clients:
            row = summarize(target, count, samples[(target.name, count)])
            report.load.append(row)
            batch = f"{row.mean_batch:.1f}" if row.mean_batch else "-"
            print(f"  {row.target:16} {row.model:9} c={count:<3} {row.requests_per_s:8.1f} req/s  "
                  f"p50 {row.p50_ms:7.1f}  p99 {row.p99_ms:7.1f} ms  batch {batch}  "
                  f"cpu {row.cpu_cores:.2f}  errors {row.errors}", flush=True)  # fmt: skip


# ---- one-off measurements ----------------------------------------------------------------------


def cold_start(report: Report, runs: int = 5) -> None:
    for _ in range(runs):
        with Server({"CONVSERVE_MODELS": "digits"}) as server:
            report.cold_start_s.append(server.wait_ready())
    print(
        f"  cold start (digits): {statistics.median(report.cold_start_s):.2f} s median", flush=True
    )


def heatmap_ratio(model: Model, report: Report) -> None:
    classifier = ModelStore(model.store).load(model.name, 1, CPU)
    array = prepare_image(model.body, classifier.spec.input, DecodeLimits(40_000_000)).array
    classifier.engine = classifier.torch_engine  # Grad-CAM runs on torch: compare like with like
    for size in (1, 8, 32):
        arrays = [array] * size
        runs: dict[str, Callable[[], object]] = {
            "plain_torch": partial(classifier.predict, arrays),
            "gradcam": partial(classifier.explain, arrays, "gradcam", None, [None] * size),
            "full_backward": partial(full_backward_grad_cam, classifier, arrays),
        }
        timings = {}
        for kind, run in runs.items():
            run()
            samples = []
            for _ in range(5 if model.name == "resnet18" else 40):
                started = time.perf_counter()
                run()
                samples.append(time.perf_counter() - started)
            timings[kind] = statistics.median(samples) * 1000
        report.heatmap.append({"model": model.name, "batch": size, **timings,
                               "ratio": timings["gradcam"] / timings["plain_torch"]})  # fmt: skip


# ---- report ---------------------------------------------------------------------------------


def limit(report: Report, model: str) -> tuple[float, str, float]:
    """(best batched img/s, its engine, best batch-1 ms) in process."""
    rows = [r for r in report.inprocess if r["model"] == model]
    best = max((r for r in rows if r["batch"] == 32), key=lambda r: r["images_per_s"])
    single = min(r["batch_ms"] for r in rows if r["batch"] == 1)
    return best["images_per_s"], best["engine"], single


def targets_table(report: Report) -> tuple[str, list[dict[str, Any]]]:
    verdicts = Verdicts()
    add = verdicts.add

    def at(target: str, model: str, clients: int) -> LoadResult | None:
        key = (target, model, clients)
        return next((r for r in report.load if (r.target, r.model, r.clients) == key), None)

    def best_convserve(model: str, clients: int) -> LoadResult | None:
        """The better of convserve's configurations (one worker, two) at this point."""
        rows = [at(name, model, clients) for name in ("convserve", "convserve-2w")]
        present = [r for r in rows if r is not None]
        return max(present, key=lambda r: r.requests_per_s) if present else None

    models = {r.model for r in report.load}
    mine = best_convserve("resnet18", 32)
    if mine is not None:
        ceiling, engine, _ = limit(report, "resnet18")
        add(
            "resnet18, 32 clients: >= 0.9x in-process batched limit",
            f"{mine.target}: {mine.requests_per_s:.1f} req/s "
            f"= {mine.requests_per_s / ceiling:.2f}x",
            f">= {0.9 * ceiling:.1f} ({engine} limit {ceiling:.1f} img/s)",
            mine.requests_per_s >= 0.9 * ceiling,
        )
    for model in sorted(models & {"digits", "seed"}):
        mine = best_convserve(model, 32)
        peers = [
            r for r in report.load if (r.model, r.clients) == (model, 32) and r.target in PEERS
        ]
        if mine is not None and peers:
            peer = max(peers, key=lambda r: r.requests_per_s)
            ratio = mine.requests_per_s / peer.requests_per_s
            add(
                f"{model}, 32 clients: >= 1.5x best peer, lower p99",
                f"{mine.target}: {mine.requests_per_s:.0f} req/s = {ratio:.2f}x {peer.target}; "
                f"p99 {mine.p99_ms:.1f} vs {peer.p99_ms:.1f} ms",
                f">= {1.5 * peer.requests_per_s:.0f} req/s, p99 < {peer.p99_ms:.1f} ms",
                ratio >= 1.5 and mine.p99_ms < peer.p99_ms,
            )
    for model in sorted(models):
        mine = at("convserve", model, 1)
        if mine is not None:
            _, _, single = limit(report, model)
            add(
                f"{model}, 1 client: p50 <= in-process batch-1 + 3 ms",
                f"p50 {mine.p50_ms:.2f} ms",
                f"<= {single + 3:.2f} ms (batch-1 {single:.2f} ms)",
                mine.p50_ms <= single + 3,
            )
    if report.cold_start_s:
        cold = statistics.median(report.cold_start_s)
        add("cold start (digits): <= 5 s", f"{cold:.2f} s", "<= 5 s", cold <= 5)
    for row in report.heatmap:
        if row["batch"] >= 8:
            add(
                f"{row['model']} heatmap batch {row['batch']}: <= 2x plain",
                f"{row['ratio']:.2f}x",
                "<= 2x",
                row["ratio"] <= 2,
            )
    return verdicts.table(), verdicts.records


def inprocess_rows(report: Report) -> list[list[str]]:
    return [
        [
            r["model"],
            r["engine"],
            str(r["batch"]),
            f"{r['batch_ms']:.2f}",
            f"{r['images_per_s']:.1f}",
            str(r["threads"]),
        ]
        for r in report.inprocess
    ]


def load_rows(report: Report) -> list[list[str]]:
    return [
        [
            r.target,
            r.model,
            str(r.clients),
            f"{r.requests_per_s:.1f}",
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            f"{r.p99_ms:.1f}",
            str(r.errors),
            f"{r.mean_batch:.1f}" if r.mean_batch else "-",
            f"{r.cpu_cores:.2f}",
            str(r.threads),
        ]
        for r in report.load
    ]


def tables(report: Report) -> str:
    inprocess_header = ["model", "engine", "batch", "ms per batch", "images/s", "threads"]
    load_header = ["target", "model", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms"]
    load_header += ["errors", "mean batch", "CPU cores", "threads"]
    return "\n".join(
        [
            f"Machine: {report.machine}",
            "",
            markdown_table(inprocess_header, inprocess_rows(report)),
            "",
            markdown_table(load_header, load_rows(report)),
        ]
    )


def plot(report: Report) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = {"xscale": "log", "xticks": [1, 8, 32, 64], "xticklabels": ["1", "8", "32", "64"]}
    written = []
    for model in sorted({r.model for r in report.load}):
        figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        for target in dict.fromkeys(r.target for r in report.load if r.model == model):
            rows = [r for r in report.load if (r.target, r.model) == (target, model)]
            rows.sort(key=lambda r: r.clients)
            clients = [r.clients for r in rows]
            (line,) = left.plot(clients, [r.requests_per_s for r in rows], marker="o", label=target)
            colour = line.get_color()
            right.plot(clients, [r.p99_ms for r in rows], marker="o", color=colour,
                       label=f"{target} p99")  # fmt: skip
            right.plot(clients, [r.p50_ms for r in rows], linestyle=":", color=colour,
                       label=f"{target} p50")  # fmt: skip
        best, engine, _ = limit(report, model)
        left.axhline(best, color="grey", linestyle="--", label=f"in-process limit ({engine})")
        left.set(title=f"{model}: throughput", xlabel="clients", ylabel="requests/s", **ticks)
        right.set(title=f"{model}: latency", xlabel="clients", ylabel="ms", yscale="log", **ticks)
        left.legend(fontsize=7)
        right.legend(fontsize=6, ncol=2)
        figure.tight_layout()
        path = IMAGES / f"bench-{model}.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["digits", "seed", "resnet18"])
    parser.add_argument("--targets", nargs="+",
                        default=["convserve", "convserve-2w", "convserve-torch", "naive",
                                 "litserve", "bentoml", "torchserve"])  # fmt: skip
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--replot", action="store_true", help="redraw plots from bench.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "bench.json").read_text())
        report = Report(
            saved["machine"], saved["inprocess"], [LoadResult(**r) for r in saved["load"]]
        )
        for image in plot(report):
            print(f"wrote {image}")
        return
    report = Report(machine())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for name in args.targets:
            if name in PEERS:
                PEERS[name].setup()
        models = prepare_models(workdir, args.models, args.threads)
        for model in models:
            print(f"== {model.name} ({model.note})", flush=True)
            inprocess(model, report)
            body_file = workdir / f"{model.name}.jpg"
            body_file.write_bytes(model.body)
            targets = [Target(name, model, args.threads) for name in args.targets]
            try:
                for target in targets:  # all up at once, idle while another one is measured
                    target.start()
                load_runs(targets, body_file, args.concurrency, args.duration, args.rounds, report)
            finally:
                for target in targets:
                    with contextlib.suppress(AssertionError):
                        pause(target.pid, False)  # a stopped process cannot take SIGTERM
                    target.stop()
            if model.name in ("digits", "resnet18"):
                heatmap_ratio(model, report)
        cold_start(report)
    summary, verdicts = targets_table(report)
    text = "## Targets\n\n" + summary + "\n\n## Measurements\n\n" + tables(report)
    payload = {
        "inprocess": report.inprocess,
        "load": [asdict(r) for r in report.load],
        "cold_start_s": report.cold_start_s,
        "heatmap": report.heatmap,
        "targets": verdicts,
    }
    path = write_results("bench", payload, text)
    for image in plot(report):
        print(f"wrote {image}")
    print(text)
    print(f"wrote {path} and {RESULTS / 'bench.md'}")


if __name__ == "__main__":
    main()
