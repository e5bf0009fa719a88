"""Ready in seconds (issue 18): launch to the first correct answer, convserve against its peers.

    .venv/bin/python -m benchmarks.ready [--repeats 3] [--servers convserve naive litserve ...]
        [--threads N] [--timeout 300]

One run, one server at a time, every server on the same resnet18 weights (random init,
imported into a temporary store as benchmarks.driver does) and the same photo
(benchmarks.driver.photo). Each measurement launches the server, then polls POST <predict URL>
with the photo until an answer is 200 and its top-1 class is the one convserve's model gives
in process (benchmarks.peers.reference); beside it, its readiness URL until 200. Both are
timed from the launch. Measured:
  - convserve, resnet18, `first start`: an empty CONVSERVE_CACHE_DIR (it measures its engines
    and exports its ONNX file), and `prepared`: a restart on that cache (the engine decision
    and the ONNX file are there);
  - convserve on the bundled store (digits and lenet5, digit-4.jpg), restarted on a warm cache;
  - the naive Litestar server (benchmarks/naive_server.py) and each peer of benchmarks.peers
    (its venv is created first if missing), one worker or replica each.
Each measurement runs `--repeats` times, the cases interleaved; the table gives medians.
Between two measurements the server's process group is stopped and any process of its tree
still alive is killed. Writes benchmarks/results/ready.json and ready.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table, write_results
from benchmarks.driver import ROOT, Model, Target, prepare_models
from benchmarks.peers import PEERS, post_image, reference
from service.store import ModelStore

POLL_S = 0.05  # between two polls of one URL
READY_GRACE_S = 30.0  # how long the readiness URL is still polled after the first answer
SERVERS = ["convserve", "naive", *PEERS]
TITLES = {"convserve": "convserve", "naive": "naive Litestar", "litserve": "LitServe",
          "bentoml": "BentoML", "torchserve": "TorchServe", "rayserve": "Ray Serve"}  # fmt: skip


@dataclass
class Case:
    """One server on one model, started one way."""

    server: str  # a Target name
    model: Model
    start: str  # how it starts: first start, prepared, ...
    env: dict[str, str] = field(default_factory=dict)  # convserve's settings beyond Target's
    cache: Path | None = None  # a fresh CONVSERVE_CACHE_DIR per repeat (first start)


@dataclass
class Sample:
    server: str
    model: str
    start: str
    repeat: int
    ready_url: str
    ready_s: float | None  # launch to the readiness URL's first 200
    answer_s: float | None  # launch to the first 200 with the expected top-1
    wrong_answers: int  # 200s with another top-1 (there should be none)
    strays_killed: int  # processes of its tree still alive after the group was stopped
    error: str | None = None


class Poll:
    """Poll until an attempt succeeds, the server exits, the deadline passes or `stop` is set."""

    def __init__(self, target: Target, deadline: float, stop: threading.Event) -> None:
        self.target, self.deadline, self.stop = target, deadline, stop

    def alive(self) -> bool:
        running = self.target.peer or self.target.server
        return running is not None and running.process.poll() is None

    def until(self, attempt: Callable[[], bool]) -> float | None:
        """Seconds from the launch to the first attempt that returned True."""
        while time.perf_counter() < self.deadline and not self.stop.is_set():
            if not self.alive():
                raise RuntimeError(f"{self.target.name} exited during start-up")
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                if attempt():  # connection refused, 503 and the like: not yet
                    return time.perf_counter() - self.target.started
            time.sleep(POLL_S)
        return None


def top_class(answer: dict[str, Any]) -> int:
    """The top-1 class index of a peer's answer or convserve's (one image: `results[0]`)."""
    result = answer["results"][0] if "results" in answer else answer
    return int(result["predictions"][0]["class_index"])


def measure(target: Target, body: bytes, expected: int, timeout: float) -> dict[str, Any]:
    """Launch `target`; time its readiness URL's first 200 and its first correct answer."""
    wrong = 0

    def ready() -> bool:
        with urllib.request.urlopen(target.ready_url, timeout=5) as response:
            return bool(response.status == 200)

    def answered() -> bool:
        nonlocal wrong
        if top_class(post_image(target.url, body)) == expected:
            return True
        wrong += 1
        if wrong >= 10:
            raise AssertionError(f"{target.name}: 10 answers with another top-1 than {expected}")
        return False

    target.launch()
    stop = threading.Event()
    poll = Poll(target, target.started + timeout, stop)
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(poll.until, answered)
        readiness = pool.submit(poll.until, ready)
        try:
            answer_s = answer.result()
            # a readiness URL that lags the first answer gets READY_GRACE_S more, no longer
            ready_s = readiness.result(timeout=READY_GRACE_S if answer_s is not None else 0)
        except TimeoutError:
            ready_s = None
        finally:
            stop.set()
    if answer_s is None:
        raise TimeoutError(f"{target.name}: no correct answer within {timeout:.0f} s")
    return {"ready_s": ready_s, "answer_s": answer_s, "wrong_answers": wrong}


def run_case(case: Case, repeat: int, expected: int, threads: int, timeout: float) -> Sample:
    """One measurement of `case`, its server stopped afterwards whatever happened."""
    env = dict(case.env)
    if case.cache is not None:
        env["CONVSERVE_CACHE_DIR"] = str(case.cache / f"repeat-{repeat}")
    target = Target(case.server, case.model, threads, env=env)
    figures: dict[str, Any] = {"ready_s": None, "answer_s": None, "wrong_answers": 0}
    error = None
    try:
        figures = measure(target, case.model.body, expected, timeout)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if target.peer is not None:
            error += "\n" + target.peer.log_tail(15)
    finally:
        strays = target.stop()  # its process group, then any process that left it
    return Sample(case.server, case.model.name, case.start, repeat, target.ready_url,
                  **figures, strays_killed=strays, error=error)  # fmt: skip


def expected_answer(model: Model) -> dict[str, float]:
    """convserve's own top-1 for the model's image, in process (what every server must answer),
    with its probability and the runner-up's (a near tie would make the check fragile)."""
    folder = model.store / model.name / str(max(ModelStore(model.store).versions(model.name)))
    probabilities = reference(folder, model.body)
    order = sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)
    return {"class_index": order[0], "probability": probabilities[order[0]],
            "runner_up": probabilities[order[1]]}  # fmt: skip


def shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(sample: Sample) -> None:
    """One line per measurement while the run goes on."""
    outcome = f"readiness {shown(sample.ready_s)} s, answer {shown(sample.answer_s)} s"
    if sample.error:
        outcome = f"FAILED: {sample.error}"
    if sample.strays_killed:
        outcome += f" ({sample.strays_killed} stray processes killed)"
    print(f"[{sample.repeat}] {sample.server} {sample.model} {sample.start}: {outcome}", flush=True)


def cases(models: dict[str, Model], servers: list[str], cache: Path) -> list[Case]:
    resnet, digits = models["resnet18"], models["digits"]
    found = []
    if "convserve" in servers:
        # `prepared` follows `first start` in every repeat and reuses its cache directory.
        found += [
            Case("convserve", resnet, "first start (empty cache)", cache=cache / "resnet18"),
            Case("convserve", resnet, "prepared (restart, same cache)", cache=cache / "resnet18"),
            Case("convserve", digits, "restart, warm cache",
                 env={"CONVSERVE_MODELS": "", "CONVSERVE_CACHE_DIR": str(cache / "bundled")}),
        ]  # fmt: skip
    found += [Case(name, resnet, "cold") for name in servers if name != "convserve"]
    return found


def summarize(samples: list[Sample]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    def median(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    summary, rows = [], []
    keys = list(dict.fromkeys((s.server, s.model, s.start) for s in samples))
    for server, model, start in keys:
        group = [s for s in samples if (s.server, s.model, s.start) == (server, model, start)]
        good = [s for s in group if s.error is None]
        ready, answer = median([s.ready_s for s in good]), median([s.answer_s for s in good])
        path = "/" + group[0].ready_url.split("/", 3)[-1]
        summary.append({"server": server, "model": model, "start": start, "ready_path": path,
                        "ready_s": ready, "answer_s": answer, "runs": len(group),
                        "failed": len(group) - len(good)})  # fmt: skip
        model_name = "digits (bundled store)" if model == "digits" else model
        answers = ", ".join(shown(s.answer_s) for s in good) or "-"
        failed = f" ({len(group) - len(good)} failed)" if len(good) < len(group) else ""
        rows.append([TITLES[server], model_name, start, f"{shown(ready)} ({path})",
                     shown(answer), answers + failed])  # fmt: skip
    return summary, rows


def commit() -> str:
    """The checkout measured (convserve's start-up changes from commit to commit)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return head + (" (with uncommitted changes)" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="measurements per case (median)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=SERVERS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                        help="torch threads of every server")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per start")
    options = parser.parse_args()
    for name in options.servers:
        if name in PEERS:
            PEERS[name].setup()  # once: later calls find the venv's stamp
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="ready-") as tmp:
        models = {
            m.name: m for m in prepare_models(Path(tmp), ["digits", "resnet18"], options.threads)
        }
        references = {name: expected_answer(model) for name, model in models.items()}
        expected = {name: int(found["class_index"]) for name, found in references.items()}
        plan = cases(models, options.servers, Path(tmp) / "cache")
        for case in plan:  # fill the bundled store's cache: its measured starts are restarts
            if case.model.name == "digits":
                report(run_case(case, -1, expected["digits"], options.threads, options.timeout))
        for repeat in range(options.repeats):
            for case in plan:
                expect = expected[case.model.name]
                samples.append(run_case(case, repeat, expect, options.threads, options.timeout))
                report(samples[-1])
    summary, rows = summarize(samples)
    versions = {}
    for name in options.servers:
        if name in PEERS and PEERS[name].stamp.is_file():
            versions[name] = PEERS[name].versions()
    table = markdown_table(
        ["server", "model", "start", "launch to readiness 200, s (URL)",
         "launch to first correct answer, s", f"all {options.repeats} runs, s"], rows)  # fmt: skip
    payload = {"repeats": options.repeats, "threads": options.threads, "poll_s": POLL_S,
               "commit": commit(), "expected_top1": references, "versions": versions,
               "summary": summary,
               "samples": [asdict(s) for s in samples]}  # fmt: skip
    path = write_results("ready", payload, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
