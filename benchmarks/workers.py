"""convserve's process layouts side by side: what the front workers + model process split costs.

    .venv/bin/python -m benchmarks.workers [--models digits resnet18] [--duration 6]
        [--configs single copies-2 front-1 front-2 front-4 torchserve]
        [--passes 3] [--baseline-commit 73a2610] [--gpu-images-per-s N]

Layouts: `single` (CONVSERVE_WORKERS=0: one process does everything), `front-N` (N front
workers, HTTP + decoding without torch, and one model process), `copies-N` (the baseline
commit's CONVSERVE_WORKERS=N, N whole servers each loading every model: `copies-1` is that
commit's single process), `torchserve` (benchmarks.peers, when its venv exists). One server at
a time, same store, same request body as benchmarks.driver. For each layout and model:
  1. requests/s, p50/p99, mean batch and CPU cores at 32 clients (hey);
  2. p50 at 1 client against the in-process batch-1 time (decode + preprocess + forward + top-k,
     no HTTP): what HTTP and the hop between processes add;
  3. resident memory of the process tree after ready and after load, and of each front worker
     (`python -m service.front`): what one more front worker costs;
  4. CPU by process during the 32-client run: requests/s per front core, the number a node's
     front tier is sized by.
The layouts run --passes times in turn and each figure is the median of its passes: on a shared
machine the rate drifts by tens of percent within minutes, and passes in turn share the drift.
Writes benchmarks/results/workers.json and workers.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import Verdicts, machine, markdown_table, process_tree, write_results
from benchmarks.driver import (
    ROOT,
    LoadResult,
    Model,
    Report,
    Sample,
    Target,
    inprocess,
    measure,
    prepare_models,
    process_cpu,
    summarize,
)
from benchmarks.peers import PEERS

FRONT = "service.front"  # the front worker's module: `python -m service.front ...`
FRONT_TIER = "front tier"  # front workers and their children (decoders, if they own any)
LAYOUT = re.compile(r"^(single|torchserve|(front|copies)-([1-9]\d*))$")
TWO = "front-2"  # the layout the targets name: two front workers + one model process
SMALL = {"digits", "seed"}  # the small models, held to 1.5x the single process


@dataclass(frozen=True)
class Layout:
    name: str
    label: str
    workers: str | None  # CONVSERVE_WORKERS; None for a peer
    baseline: bool  # run the --baseline-commit's code instead of this checkout's


def layout(name: str) -> Layout:
    match = LAYOUT.match(name)
    if match is None:
        raise argparse.ArgumentTypeError(f"{name}: single, front-N, copies-N or torchserve")
    kind, count = match[2], match[3]
    if name == "single":
        return Layout(name, "single process (CONVSERVE_WORKERS=0)", "0", False)
    if name == "torchserve":
        return Layout(name, "TorchServe, one worker", None, False)
    if kind == "front":
        label = f"{count} front worker{'s' if count != '1' else ''} + one model process"
        return Layout(name, f"{label} (CONVSERVE_WORKERS={count})", count, False)
    label = "single process" if count == "1" else f"{count} whole copies of the server"
    return Layout(name, f"{label}, baseline code (CONVSERVE_WORKERS={count})", count, True)


# ---- processes ------------------------------------------------------------------------------


def role(pid: int) -> str:
    """What a process is: the module after `-m` (service.front, service.decoder), else the
    script or program name (java, torchserve_launch.py)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "gone"
    argv = [arg for arg in argv if arg]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    scripts = [Path(arg).name for arg in argv[1:] if arg.endswith(".py")]
    return scripts[0] if scripts else Path(argv[0]).name if argv else "?"


def status_kb(path: str, key: str) -> int:
    """One `Key:   N kB` line of a /proc file, 0 if it or the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def maps_torch(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return False


@dataclass
class Process:
    pid: int
    role: str
    rss_mb: float
    pss_mb: float  # shared pages split between their users: the tree's sum does not double count
    subtree_rss_mb: float  # with its children (a front worker's decoders, if it has any)
    torch: bool  # libtorch mapped: a front worker should have none


@dataclass
class Memory:
    rss_mb: float
    pss_mb: float
    processes: list[Process]

    def fronts(self) -> list[Process]:
        return [p for p in self.processes if p.role == FRONT]


def memory(pid: int) -> Memory:
    """RSS and PSS of every process in the tree, from /proc."""
    members = process_tree(pid)
    rss = {m: status_kb(f"/proc/{m}/status", "VmRSS") / 1024 for m in members}
    pss = {m: status_kb(f"/proc/{m}/smaps_rollup", "Pss") / 1024 for m in members}
    subtree = {m: sum(rss.get(child, 0.0) for child in process_tree(m)) for m in members}
    processes = [Process(m, role(m), rss[m], pss[m], subtree[m], maps_torch(m)) for m in members]
    return Memory(sum(rss.values()), sum(p.pss_mb for p in processes), processes)


def cpu_parts(pid: int) -> dict[str, float]:
    """CPU seconds by process role, and of the front tier (front workers with their children)."""
    parts: dict[str, float] = {}
    for member in process_tree(pid):
        name = role(member)
        used = process_cpu(member)
        parts[name] = parts.get(name, 0.0) + used
        if name == FRONT:
            parts[FRONT_TIER] = parts.get(FRONT_TIER, 0.0)
            parts[FRONT_TIER] += sum(process_cpu(m) for m in process_tree(member))
    return parts


# ---- one layout -----------------------------------------------------------------------------


@dataclass
class Row:
    config: str
    label: str
    model: str
    skipped: str | None = None
    at_1: LoadResult | None = None
    at_32: LoadResult | None = None
    cores: dict[str, float] = field(default_factory=dict)  # by role, during the 32-client runs
    ready: Memory | None = None
    after_load: Memory | None = None
    each_pass: list[float] = field(default_factory=list)  # req/s at 32 clients, every pass


def merged(rows: list[Row]) -> list[Row]:
    """One row per layout and model from several passes (--passes): the pass with the median
    32-client rate, with the median 1-client p50 of all passes. On a shared machine the rate
    drifts by tens of percent over minutes; passes taken in turn see the same drift."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.config, row.model), []).append(row)
    result = []
    for group in groups.values():
        ran = [r for r in group if r.at_32 is not None and r.at_1 is not None]
        if not ran:
            result.append(group[0])
            continue
        ran.sort(key=lambda r: r.at_32.requests_per_s if r.at_32 else 0.0)
        row = ran[len(ran) // 2]
        alone = sorted(ran, key=lambda r: r.at_1.p50_ms if r.at_1 else 0.0)
        row.at_1 = alone[len(alone) // 2].at_1
        row.each_pass = [r.at_32.requests_per_s for r in group if r.at_32 is not None]
        result.append(row)
    return result


def cores(samples: list[Sample]) -> dict[str, float]:
    wall = sum(s.wall for s in samples)
    names = {name for s in samples for name in s.cpu_parts}
    return {name: sum(s.cpu_parts.get(name, 0.0) for s in samples) / wall for name in names}


def run_layout(
    chosen: Layout, model: Model, body_file: Path, code: Path, options: argparse.Namespace
) -> Row:
    """Start the layout on `model`, measure it, stop it; a layout that will not start (this
    code refuses its worker count, a peer without its venv) is a skipped row, not a crash."""
    row = Row(chosen.name, chosen.label, model.name)
    if chosen.workers is None and not PEERS[chosen.name].stamp.is_file():
        row.skipped = (
            f"no venv at {PEERS[chosen.name].venv}; set it up once with "
            f"`python -m benchmarks.peers setup {chosen.name}`"
        )
        return row
    # cwd and PYTHONPATH both: `python -m` puts the working directory first on sys.path
    env = {"PYTHONPATH": str(code), "CONVSERVE_WORKERS": str(chosen.workers)}
    target = Target(chosen.name, model, options.threads, env, code)
    try:
        target.start()
        row.ready = memory(target.pid)
        rounds = range(options.rounds)
        alone = [measure(target, body_file, 1, options.duration) for _ in rounds]
        row.at_1 = summarize(target, 1, alone)
        parts = partial(cpu_parts, target.pid)
        samples = [measure(target, body_file, 32, options.duration, parts) for _ in rounds]
        row.at_32, row.cores = summarize(target, 32, samples), cores(samples)
        row.after_load = memory(target.pid)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as error:
        row.skipped = f"failed with CONVSERVE_WORKERS={chosen.workers}: {error}"
    finally:
        target.stop()
    return row


@contextlib.contextmanager
def checkout(commit: str) -> Iterator[Path]:
    """A detached worktree of `commit` in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="convserve-baseline-") as folder:
        tree = Path(folder) / "tree"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            yield tree
        finally:
            subprocess.run([*git, "remove", "--force", str(tree)], check=False)


# ---- report ---------------------------------------------------------------------------------


def number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def batch_one(report: Report, model: str) -> tuple[float, str] | None:
    """The in-process batch-1 time (ms) of the faster engine, as driver.limit() takes it."""
    rows = [r for r in report.inprocess if (r["model"], r["batch"]) == (model, 1)]
    best = min(rows, key=lambda r: float(r["batch_ms"]), default=None)
    return None if best is None else (float(best["batch_ms"]), str(best["engine"]))


def front_rate(row: Row) -> tuple[float, float] | None:
    """(front-tier cores, requests/s per front core) at 32 clients; None without fronts."""
    used = row.cores.get(FRONT_TIER, 0.0)
    if row.at_32 is None or used <= 0:
        return None
    return used, row.at_32.requests_per_s / used


def tables(rows: list[Row], report: Report) -> list[str]:
    """Throughput, latency against the in-process limit, memory, CPU: one row per layout and
    model that ran."""
    speed, latency, memory, cpu = [], [], [], []
    for r in rows:
        if r.at_1 is None or r.at_32 is None or r.ready is None or r.after_load is None:
            continue
        many, limit, fronts = r.at_32, batch_one(report, r.model), r.after_load.fronts()
        speed.append([r.config, r.model, number(many.requests_per_s), number(many.p50_ms),
                      number(many.p99_ms), number(many.mean_batch), str(many.errors),
                      ", ".join(f"{rate:.0f}" for rate in r.each_pass) or "-"])  # fmt: skip
        latency.append([r.config, r.model, number(r.at_1.p50_ms, 2),
                        "-" if limit is None else f"{limit[0]:.2f} ({limit[1]})",
                        "-" if limit is None else f"{r.at_1.p50_ms - limit[0]:+.2f}"])  # fmt: skip
        each = ", ".join(f"{p.rss_mb:.0f} ({p.subtree_rss_mb:.0f})" for p in fronts) or "none"
        torch = ("yes" if any(p.torch for p in fronts) else "no") if fronts else "-"
        memory.append([r.config, r.model, str(len(r.after_load.processes)),
                       number(r.ready.rss_mb, 0), number(r.after_load.rss_mb, 0),
                       number(r.after_load.pss_mb, 0), each, torch])  # fmt: skip
        rate = front_rate(r)
        cpu.append([r.config, r.model, number(many.cpu_cores, 2),
                    ", ".join(f"{name} {used:.2f}" for name, used in sorted(r.cores.items())),
                    "-" if rate is None else f"{rate[1]:.0f} ({rate[0]:.2f} cores)"])  # fmt: skip
    return [
        markdown_table(["config", "model", "req/s", "p50 ms", "p99 ms", "mean batch", "errors",
                        "req/s of each pass"], speed),
        markdown_table(["config", "model", "p50 ms, 1 client", "in-process batch 1 ms (engine)",
                        "difference ms"], latency),
        markdown_table(["config", "model", "processes", "RSS MB ready", "RSS MB after load",
                        "PSS MB after load", "each front worker: RSS MB (with its children)",
                        "torch in a front"], memory),
        markdown_table(["config", "model", "CPU cores", "by process (cores)",
                        "req/s per front core"], cpu),
    ]  # fmt: skip


def front_check(rows: list[Row]) -> tuple[str, float | None]:
    """The "a front worker costs <= 150 MB" line. A worker's own RSS counts the libraries it
    shares with its decoders and the others; what one more worker costs is the growth of the
    whole tree's PSS from front-1 to the largest front-N, per added worker."""
    fronts = [p for r in rows if r.after_load for p in r.after_load.fronts()]
    if not fronts:
        return (f"No `python -m {FRONT}` process was found: this code has no front workers "
                "(yet), so front-N ran whatever CONVSERVE_WORKERS=N means here."), None  # fmt: skip
    own = max(p.rss_mb for p in fronts)
    lines = [f"Largest front worker: {own:.0f} MB RSS on its own, "
             f"{max(p.subtree_rss_mb for p in fronts):.0f} MB with its decoders (RSS counts "
             "shared pages in each process)."]  # fmt: skip
    added: list[float] = []
    for model in sorted({r.model for r in rows}):
        sized = sorted(
            (len(r.after_load.fronts()), r.after_load.pss_mb)
            for r in rows
            if r.model == model and r.after_load and r.after_load.fronts()
        )
        if len(sized) >= 2 and sized[-1][0] > sized[0][0]:
            (few, low), (many, high) = sized[0], sized[-1]
            added.append((high - low) / (many - few))
            lines.append(f"{model}: one more worker adds {added[-1]:.0f} MB of tree PSS "
                         f"(front-{few} to front-{many}).")  # fmt: skip
    cost = max(added) if added else own
    verdict = "met" if cost <= 150 else "NOT met"
    lines.append(f"A front worker costs <= 150 MB: {cost:.0f} MB: {verdict}.")
    return " ".join(lines), cost


def find(rows: list[Row], config: str, model: str) -> Row | None:
    return next((r for r in rows if (r.config, r.model) == (config, model)), None)


def by_pass(rows: list[Row], model: str, mine: str, theirs: str) -> tuple[float, str] | None:
    """`mine`'s 32-client rate over `theirs`: the median of the ratios within each pass (a pass
    runs every layout in turn, so both see the same drift of the machine), or the ratio of the
    medians where a pass of either is missing; with how it was taken."""
    a, b = find(rows, mine, model), find(rows, theirs, model)
    if a is None or b is None or a.at_32 is None or b.at_32 is None:
        return None
    if len(a.each_pass) == len(b.each_pass) > 0:
        ratios = [x / y for x, y in zip(a.each_pass, b.each_pass, strict=True)]
        each = ", ".join(f"{ratio:.2f}x" for ratio in ratios)
        return statistics.median(ratios), f"median of the passes: {each}"
    ratio = a.at_32.requests_per_s / b.at_32.requests_per_s
    return ratio, f"{a.at_32.requests_per_s:.0f} / {b.at_32.requests_per_s:.0f} req/s, medians"


def targets(
    rows: list[Row], report: Report, front_cost: float | None
) -> tuple[str, list[dict[str, Any]]]:
    """The process-design issue's targets for two front workers, each with its verdict: against
    the single process and the baseline's CONVSERVE_WORKERS=2 (copies-2) at 32 clients, against
    the in-process batch-1 time at one client, and what one more worker costs."""
    verdicts = Verdicts()
    add = verdicts.add
    for model in sorted({r.model for r in rows}):
        floor = 1.5 if model in SMALL else 1.0
        single = by_pass(rows, model, TWO, "single")
        if single is not None:
            add(f"{model}, 32 clients: 2 workers >= {floor:.1f}x the single process",
                f"{single[0]:.2f}x ({single[1]})", f">= {floor:.1f}x",
                single[0] >= floor)  # fmt: skip
        old = by_pass(rows, model, TWO, "copies-2") if model in SMALL else None
        if old is not None:
            add(f"{model}, 32 clients: 2 workers not below the baseline's CONVSERVE_WORKERS=2",
                f"{old[0]:.2f}x ({old[1]})", ">= 1.0x", old[0] >= 1.0)  # fmt: skip
        two, one = find(rows, TWO, model), find(rows, "single", model)
        mine = None if two is None or two.at_32 is None else two.at_32.mean_batch
        theirs = None if one is None or one.at_32 is None else one.at_32.mean_batch
        if mine is not None and theirs is not None:
            add(f"{model}, 32 clients: mean batch with 2 workers >= the single process's",
                f"{mine:.1f} against {theirs:.1f}", f">= {theirs:.1f}", mine >= theirs)  # fmt: skip
        limit = batch_one(report, model)
        if two is not None and two.at_1 is not None and limit is not None:
            hop = ("" if one is None or one.at_1 is None else
                   f"; the hop: {two.at_1.p50_ms - one.at_1.p50_ms:+.2f} ms against the "
                   f"single process's {one.at_1.p50_ms:.2f}")  # fmt: skip
            add(f"{model}, 1 client: p50 with 2 workers <= in-process batch-1 + 3 ms",
                f"{two.at_1.p50_ms:.2f} ms{hop}",
                f"<= {limit[0] + 3:.2f} ms (batch-1 {limit[0]:.2f} ms, {limit[1]})",
                two.at_1.p50_ms <= limit[0] + 3)  # fmt: skip
    if front_cost is not None:
        add("one more front worker costs <= 150 MB", f"{front_cost:.0f} MB", "<= 150 MB",
            front_cost <= 150)  # fmt: skip
    return verdicts.table(), verdicts.records


def paper(rows: list[Row], gpu: float | None) -> tuple[str, dict[str, Any]]:
    """The HTTP + decode rate per front core measured here, times 15 front cores of a 16-core
    GPU node, against a GPU forward rate the caller supplies: nothing of the GPU is measured."""
    rate_g = f"{gpu:.0f} images/s, as given by --gpu-images-per-s" if gpu else (
        "not given: pass --gpu-images-per-s")  # fmt: skip
    lines = ["## 16-core GPU node on paper", "",
             "15 cores run front workers; one is left to the supervisor and the model process "
             "feeding the GPU. node req/s = min(15 x req/s per front core, G), where G, the "
             "resnet18 fp32 forward rate at batch 32 on one H200, is an assumption, not "
             f"measured here ({rate_g}).", ""]  # fmt: skip
    facts: dict[str, Any] = {"front_cores": 15, "gpu_images_per_s": gpu}
    for model, body in (("digits", "28x28 digit"), ("resnet18", "640x480 photo to 224x224")):
        row = find(rows, "front-1", model)
        rate = None if row is None else front_rate(row)
        if row is None or row.at_32 is None or rate is None:
            lines.append(f"- {model}: front-1 did not run with a front worker: no per-core rate.")
            continue
        ceiling = 15 * rate[1]
        node = f"min({ceiling:.0f}, {gpu:.0f}) = {min(ceiling, gpu):.0f}" if gpu else (
            f"min({ceiling:.0f}, G)")  # fmt: skip
        facts[model] = {"requests_per_s": row.at_32.requests_per_s, "front_cores": rate[0],
                        "per_front_core": rate[1], "ceiling": ceiling}  # fmt: skip
        lines.append(f"- {model} (JPEG {body}): front-1 served {row.at_32.requests_per_s:.0f} "
                     f"req/s on {rate[0]:.2f} front cores = {rate[1]:.0f} req/s per front "
                     f"core; x 15 = {ceiling:.0f} req/s of HTTP + decode; node = {node} "
                     "req/s.")  # fmt: skip
    lines += ["", "The per-core rates are this machine's (2 cores shared with hey and the model "
              "process); a node's cores differ. The resnet18 line, not digits, bounds a resnet18 "
              "GPU node: its requests carry photos."]  # fmt: skip
    return "\n".join(lines), facts


def document(rows: list[Row], layouts: list[Layout], report: Report, options: argparse.Namespace,
             baseline: str) -> tuple[str, dict[str, Any]]:  # fmt: skip
    legend = "\n".join(f"- `{chosen.name}`: {chosen.label}" for chosen in layouts)
    skipped = [f"- {r.config} ({r.model}): skipped: {r.skipped}" for r in rows if r.skipped]
    check, largest = front_check(rows)
    estimate, facts = paper(rows, options.gpu_images_per_s)
    speed, latency, memory, cpu = tables(rows, report)
    goals, verdicts = targets(rows, report, largest)
    text = "\n\n".join([
        f"# Process layouts\n\nMachine: {report.machine}\n\nBaseline commit {baseline}; "
        f"{options.duration:g} s per sample, {options.rounds} round(s), "
        f"{options.passes} pass(es) over the layouts in turn (medians), "
        f"CONVSERVE_THREADS={options.threads}; one server at a time.\n\n{legend}",
        *(["Skipped:\n\n" + "\n".join(skipped)] if skipped else []),
        "## Throughput at 32 clients\n\n" + speed,
        "## Latency at 1 client against the in-process batch-1 time\n\nThe difference is "
        "what HTTP and the hop between processes add.\n\n" + latency,
        "## Memory (whole process tree, from /proc)\n\n" + memory + "\n\n" + check,
        "## CPU during the 32-client runs\n\n" + cpu,
        "## Against the targets\n\nTwo front workers (`front-2`); a ratio at 32 clients is "
        "the median of its passes' ratios, each pass running every layout in turn.\n\n"
        + goals,
        estimate,
    ])  # fmt: skip
    payload = {
        "settings": {"duration_s": options.duration, "rounds": options.rounds,
                     "passes": options.passes,
                     "threads": options.threads, "baseline_commit": baseline},
        "layouts": [asdict(chosen) for chosen in layouts],
        "inprocess": report.inprocess,
        "rows": [asdict(r) for r in rows],
        "largest_front_mb": largest,
        "targets": verdicts,
        "paper": facts,
    }  # fmt: skip
    return text, payload


def summary(row: Row) -> str:
    """One progress line per layout and model."""
    if row.skipped or row.at_1 is None or row.at_32 is None or row.ready is None:
        return f"skipped: {row.skipped}"
    many, ready = row.at_32, row.ready
    return (f"c=32 {many.requests_per_s:7.1f} req/s p99 {many.p99_ms:6.1f} ms batch "
            f"{number(many.mean_batch)} cpu {many.cpu_cores:.2f}; c=1 p50 {row.at_1.p50_ms:.2f} "
            f"ms; {ready.rss_mb:.0f} MB in {len(ready.processes)} processes, "
            f"{len(ready.fronts())} front worker(s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["digits", "resnet18"],
                        choices=["digits", "seed", "resnet18"])  # fmt: skip
    parser.add_argument("--configs", nargs="+", type=layout, default=[layout(name) for name in (
        "single", "copies-2", "front-1", "front-2", "front-4", "torchserve")],
        help="single, front-N, copies-N (the baseline commit's), torchserve")  # fmt: skip
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per hey sample")
    parser.add_argument("--rounds", type=int, default=1, help="samples per client count")
    parser.add_argument("--passes", type=int, default=3,
                        help="run the layouts this many times in turn; report medians")  # fmt: skip
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--baseline-commit", default="73a2610", help="today's code, for copies-N")
    parser.add_argument("--gpu-images-per-s", type=float, default=None,
                        help="the GPU forward rate for the paper estimate (yours)")  # fmt: skip
    options = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("hey not found: apt-get install -y hey")
    layouts: list[Layout] = options.configs
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", options.baseline_commit]
    baseline = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
    report = Report(machine())
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        old = stack.enter_context(checkout(baseline)) if any(c.baseline for c in layouts) else ROOT
        for model in prepare_models(Path(folder), options.models, options.threads):
            print(f"== {model.name} ({model.note})", flush=True)
            inprocess(model, report, sizes=(1,))
            body_file = Path(folder) / f"{model.name}.jpg"
            body_file.write_bytes(model.body)
            for _ in range(options.passes):
                for chosen in layouts:
                    code = old if chosen.baseline else ROOT
                    rows.append(run_layout(chosen, model, body_file, code, options))
                    print(f"  {chosen.name:10} {summary(rows[-1])}", flush=True)
    rows = merged(rows)
    text, payload = document(rows, layouts, report, options, baseline)
    path = write_results("workers", payload, text)
    print(text)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
