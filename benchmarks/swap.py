"""A version swap under steady load: does anyone notice?

    .venv/bin/python -m benchmarks.swap [--clients 4] [--steady 20] [--after 10]
        [--phases api watch]

resnet18 v1 (random init, default settings: the front workers and the model process) serves a
closed loop of `--clients` clients, each posting the benchmark photo (benchmarks.driver.photo)
to /models/resnet18/predict and recording when each answer came, how long it took and which
version gave it. After a warm-up second and `--steady` seconds, v2 (another random init) appears
in the store and takes over, and v1 is retired:
  - `api`: POST .../versions/2/load, then POST .../versions/1/unload (CONVSERVE_API_KEY set);
  - `watch`: CONVSERVE_WATCH=1; v2 appears in the store, the watcher loads it, and once it
    serves, v1 leaves the store and POST .../versions/1/unload (the watcher loads again any
    version still in the store that is not loaded: unloading v1 alone would not retire it).
Both versions are written by `convserve import` beforehand (so, as after any import on this
machine, their engine is already decided), and v2 appears atomically (a symlink made in one
call), as `import` renames a finished folder into place. The swap window runs from the load
call (api) or v2's appearance (watch) until v2 has answered and the unload call has returned.
Figures per phase: the steady p50 and p99 before the swap; in the window (every request that
overlaps it) the worst latency, the p99 and the number above 2x the steady p99 (the issue's
target: none); the time from the call until v2 first answers and until v1 is retired; v2's
load time as GET /models reports it (verify, load, engine, warm-up); failed requests; the p99
of the `--after` seconds after.
Writes benchmarks/results/swap.json and .md, and docs/images/swap.png.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import msgspec

from benchmarks.common import Server, markdown_table, write_results
from benchmarks.driver import IMAGES, photo
from service.api.schemas import ModelList, ModelStatus, PredictResponse, VersionStatus

MODEL = "resnet18"
KEY = "swap-benchmark"
PHASES = {
    "api": "management API: load v2, unload v1",
    "watch": "store watcher loads v2 (CONVSERVE_WATCH=1), v1 leaves the store, unload v1",
}


@dataclass(frozen=True)
class Answer:
    """One request, its times in seconds from the start of the load."""

    started: float
    ended: float
    version: int | None  # None: it failed
    error: str | None = None

    @property
    def latency_ms(self) -> float:
        return (self.ended - self.started) * 1000.0


class Load:
    """A closed loop: `clients` threads, each posting `body` again as soon as it is answered."""

    def __init__(self, url: str, body: bytes, clients: int) -> None:
        self.url, self.body = url, body
        self.origin = time.perf_counter()
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def now(self) -> float:
        return time.perf_counter() - self.origin

    def _client(self) -> None:
        headers = {"content-type": "image/jpeg"}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self._stop.is_set():
                started = self.now()
                try:
                    response = client.post(f"/models/{MODEL}/predict", content=self.body,
                                           headers=headers)  # fmt: skip
                except httpx.HTTPError as error:
                    answer = Answer(started, self.now(), None, f"{type(error).__name__}: {error}")
                else:
                    ended = self.now()
                    if response.status_code == 200:
                        model = msgspec.json.decode(response.content, type=PredictResponse).model
                        answer = Answer(started, ended, model.version)
                    else:
                        answer = Answer(started, ended, None, f"HTTP {response.status_code}")
                with self._lock:
                    self.answers.append(answer)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class Phase:
    name: str
    how: str
    swap_start_s: float  # on the load's clock
    swap_end_s: float  # v2 has answered and v1 is retired
    load_call_s: float | None  # how long POST .../load took (api only)
    unload_call_s: float
    steady_p50_ms: float
    steady_p99_ms: float
    v2_answers_after_s: float | None  # from the call (or v2's appearance) to its first answer
    v1_retired_after_s: float  # from the call (or v2's appearance) until the unload returned
    v2_load_s: float | None  # the server's own figure: verify, load, engine, warm-up
    v2_engine: str | None
    versions_at_end: dict[int, str]  # GET /models after the run: version -> status
    window_requests: int
    window_worst_ms: float
    window_p99_ms: float
    window_over_2x: int  # requests in the window above 2x the steady p99
    failures: int  # over the whole run
    window_failures: int
    after_p99_ms: float
    requests: int
    met: bool  # no latency in the window above 2x the steady p99, and nothing failed
    answers: list[Answer] = field(default_factory=list)


def call(url: str, path: str) -> float:
    """POST a management call; seconds it took."""
    started = time.perf_counter()
    response = httpx.post(url + path, headers={"x-api-key": KEY}, timeout=300)
    response.raise_for_status()
    return time.perf_counter() - started


def wait_serving(url: str, version: int, timeout: float = 300.0) -> None:
    """Poll GET /models until `version` serves (the watcher loads it on its own schedule)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if model_status(url).serving_version == version:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{MODEL} v{version} did not start serving within {timeout:.0f} s")


def import_version(store: Path, cache: Path, seed: int) -> Path:
    """`convserve import resnet18 --random-init` into its own store: that folder, complete."""
    subprocess.run([sys.executable, "-m", "service", "import", MODEL, "--random-init",
                    "--seed", str(seed), "--store", str(store), "--cache-dir", str(cache)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return store / MODEL / "1"


def run_phase(name: str, versions: list[Path], workdir: Path, cache: Path, body: bytes,
              options: argparse.Namespace) -> Phase:  # fmt: skip
    store = workdir / f"store-{name}"
    (store / MODEL).mkdir(parents=True)
    (store / MODEL / "1").symlink_to(versions[0])
    env = {"CONVSERVE_STORE": str(store), "CONVSERVE_CACHE_DIR": str(cache),
           "CONVSERVE_API_KEY": KEY,
           "CONVSERVE_WATCH": "1" if name == "watch" else "0"}  # fmt: skip
    load_call = None
    with Server(env) as server:
        server.wait_ready()
        with Load(server.url, body, options.clients) as load:
            time.sleep(1.0 + options.steady)  # a warm-up second, then the steady period
            start = load.now()
            (store / MODEL / "2").symlink_to(versions[1])  # one call: appears complete
            if name == "api":
                load_call = call(server.url, f"/models/{MODEL}/versions/2/load")
            else:
                wait_serving(server.url, 2)
                (store / MODEL / "1").unlink()
            unload_call = call(server.url, f"/models/{MODEL}/versions/1/unload")
            retired = load.now()
            time.sleep(options.after)
        answers = sorted(load.answers, key=lambda a: a.ended)
        states = {v.version: v for v in model_status(server.url).versions}
    return summarize(name, answers, start, retired, load_call, unload_call, states)


def model_status(url: str) -> ModelStatus:
    listing = msgspec.json.decode(httpx.get(url + "/models", timeout=10).content, type=ModelList)
    return next(m for m in listing.models if m.name == MODEL)


def summarize(name: str, answers: list[Answer], start: float, retired: float,
              load_call: float | None, unload_call: float,
              states: dict[int, VersionStatus]) -> Phase:  # fmt: skip
    """The figures of one phase; `states`: the model's versions as GET /models ends it."""
    first_v2 = next((a.ended for a in answers if a.version == 2), None)
    end = retired if first_v2 is None else max(retired, first_v2)
    steady = [a.latency_ms for a in answers if 1.0 <= a.ended < start and a.version is not None]
    window = [a for a in answers if a.ended >= start and a.started <= end]
    latencies = [a.latency_ms for a in window]
    after = [a.latency_ms for a in answers if a.started > end and a.version is not None]
    steady_p99 = percentile(steady, 0.99)
    failures = [a for a in answers if a.version is None]
    window_failures = sum(1 for a in window if a.version is None)
    over = sum(1 for v in latencies if v > 2 * steady_p99)
    return Phase(
        name=name, how=PHASES[name], swap_start_s=start, swap_end_s=end, load_call_s=load_call,
        unload_call_s=unload_call, steady_p50_ms=percentile(steady, 0.5), steady_p99_ms=steady_p99,
        v2_answers_after_s=None if first_v2 is None else first_v2 - start,
        v1_retired_after_s=retired - start, v2_load_s=states[2].load_seconds,
        v2_engine=states[2].engine,
        versions_at_end={number: state.status for number, state in states.items()},
        window_requests=len(window), window_worst_ms=max(latencies, default=math.nan),
        window_p99_ms=percentile(latencies, 0.99), window_over_2x=over, failures=len(failures),
        window_failures=window_failures, after_p99_ms=percentile(after, 0.99),
        requests=len(answers), met=over == 0 and not failures, answers=answers,
    )  # fmt: skip


def plot(phases: list[Phase]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(phases), 1, figsize=(11, 3.6 * len(phases)), squeeze=False)
    for axis, phase in zip(axes[:, 0], phases, strict=True):
        start = phase.swap_start_s
        for version, colour in ((1, "tab:blue"), (2, "tab:orange")):
            shown = [a for a in phase.answers if a.version == version]
            axis.scatter([a.ended - start for a in shown], [a.latency_ms for a in shown], s=6,
                         color=colour, label=f"answered by v{version}")  # fmt: skip
        failed = [a for a in phase.answers if a.version is None]
        if failed:
            axis.scatter([a.ended - start for a in failed], [a.latency_ms for a in failed],
                         marker="x", color="red", label="failed")  # fmt: skip
        axis.axvspan(0, phase.swap_end_s - start, color="grey", alpha=0.2, label="swap window")
        axis.axvline(phase.v1_retired_after_s, color="black", linewidth=0.8,
                     label="v1 unload returned")  # fmt: skip
        axis.axhline(phase.steady_p99_ms, color="grey", linestyle=":",
                     label=f"steady p99 {phase.steady_p99_ms:.0f} ms")  # fmt: skip
        axis.axhline(2 * phase.steady_p99_ms, color="red", linestyle="--",
                     label=f"2x steady p99 {2 * phase.steady_p99_ms:.0f} ms")  # fmt: skip
        axis.set(title=f"resnet18 swap, {phase.how}", xlabel="s from the swap's start",
                 ylabel="latency ms", ylim=(0, None))  # fmt: skip
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    path = IMAGES / "swap.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def loaded(phase: Phase) -> str:
    ready = [f"v{n}" for n, state in sorted(phase.versions_at_end.items()) if state == "ready"]
    return ", ".join(ready) or "none"


def table(phases: list[Phase]) -> str:
    rows = [[p.name, number(p.steady_p50_ms), number(p.steady_p99_ms),
             number(p.v2_answers_after_s, 2), number(p.v1_retired_after_s, 2),
             f"{number(p.v2_load_s, 2)} ({p.v2_engine or '-'})",
             number(p.window_worst_ms), number(p.window_p99_ms),
             f"{p.window_over_2x} of {p.window_requests}", f"{p.failures} ({p.window_failures})",
             number(p.after_p99_ms), loaded(p), "met" if p.met else "NOT met"]
            for p in phases]  # fmt: skip
    return markdown_table(
        ["swap", "steady p50 ms", "steady p99 ms", "v2 answers after s", "v1 retired after s",
         "v2 load s (engine)",
         "worst in window ms", "p99 in window ms", "above 2x steady p99", "failed (in window)",
         "p99 after ms", "loaded at the end", "target"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds before the swap")
    parser.add_argument("--after", type=float, default=10.0, help="seconds after the swap")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    options = parser.parse_args()
    body = photo()
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cache = workdir / "cache"
        versions = [import_version(workdir / f"v{seed}", cache, seed) for seed in (1, 2)]
        for name in options.phases:
            phases.append(run_phase(name, versions, workdir, cache, body, options))
            print(table(phases[-1:]), flush=True)
    text = table(phases)
    settings = {"clients": options.clients, "steady_s": options.steady, "after_s": options.after,
                "workers": os.environ.get("CONVSERVE_WORKERS", "default")}  # fmt: skip
    path = write_results("swap", {"settings": settings, "phases": [asdict(p) for p in phases]},
                         text)  # fmt: skip
    print(f"wrote {plot(phases)}")
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
