"""Resident memory after ready, per process: what the service and each model cost.

    .venv/bin/python -m benchmarks.memory [--python PATH [PATH ...]]

`--python` names the installs to measure, each by its interpreter (default: this one): another
venv's python, say one with CPU-only torch and this checkout installed with `pip install -e`,
serves this checkout's code on that venv's packages. For each install and each store:
  - `empty`: no model (CONVSERVE_ALLOW_EMPTY=1), the baseline;
  - `bundled`: model_store/ (digits and lenet5);
  - `resnet18`: resnet18 alone (random init, imported into a temporary store);
  - `both`: the bundled models and resnet18 in one store (symlinks to the same folders);
`convserve serve` runs with default settings (CONVSERVE_WORKERS at its default). Once
/health/ready answers 200 and the process tree has stopped changing, RSS (VmRSS) and PSS
(/proc/<pid>/smaps_rollup, where readable: shared pages split between their users, so the
tree's sum counts each once) are read for every process: the supervisor, each front worker
(with its decoder processes), the model process. What a store adds is its figure less the
empty store's. For the model process, the shared libraries it maps are listed by the package
that ships them, with their resident MB (/proc/<pid>/smaps): torch, nvidia (CUDA), onnxruntime,
onnx. onnxscript is pure Python, so it shows no library of its own, but it imports onnx: no
onnx library mapped means no onnxscript either. The engine each version serves with (GET
/models) is recorded too: an ONNX Runtime session holds the weights beside the torch module.
Each install starts once on its largest store before the measured starts, so that the engine
decisions are recorded in its cache directory and every measured start is a restart.
Writes benchmarks/results/memory.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import msgspec

from benchmarks.common import Server, markdown_table, process_tree, write_results
from benchmarks.driver import ROOT
from benchmarks.workers import FRONT, Memory, Process, memory
from service.api.schemas import ModelList
from service.importing import import_torchvision
from service.store import ModelStore

MODEL_PROCESS = "service.modelhost"
SUPERVISOR = "service"  # `python -m service serve`
STORES = ("empty", "bundled", "resnet18", "both")
NEEDS_TORCHVISION = {"resnet18", "both"}
HEAVY = ("torch", "nvidia", "torchvision", "onnxruntime", "onnx")  # packages whose files we list


@dataclass
class Run:
    store: str
    skipped: str | None = None
    ready_s: float | None = None
    memory: Memory | None = None
    libraries: dict[str, float] = field(default_factory=dict)  # model process: package -> MB
    library_files: list[str] = field(default_factory=list)  # of the HEAVY packages
    added: dict[str, float] = field(default_factory=dict)  # against the empty store
    engines: dict[str, str] = field(default_factory=dict)  # "name vN" -> engine it serves with


@dataclass
class Install:
    python: str
    torch: str
    torchvision: str | None  # None: it cannot be imported (see problem)
    problem: str | None = None
    first_start_s: float | None = None  # the start that records the engine decisions
    runs: list[Run] = field(default_factory=list)


def probe(python: str, module: str) -> tuple[str | None, str | None]:
    """(version, None) of a module as `python` imports it, or (None, the error's last line)."""
    script = f"import {module}; print({module}.__version__)"
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          check=False)  # fmt: skip
    if done.returncode == 0:
        return done.stdout.split()[-1], None
    lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
    return None, f"import {module} fails: {lines[-1]}"


def library_package(path: str) -> str | None:
    """The package a mapped shared library ships in (`nvidia` for the CUDA libraries torch
    pulls in), `system` outside site-packages; None for what is no shared library."""
    if ".so" not in Path(path).name:
        return None
    _, found, inside = path.partition("site-packages/")
    return inside.split("/")[0].removesuffix(".libs") if found else "system"


def libraries(pid: int) -> tuple[dict[str, float], list[str]]:
    """Resident MB of a process's shared libraries by package, and the file names of those in
    HEAVY packages."""
    resident: dict[str, float] = {}
    files: set[str] = set()
    package = None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):  # a mapping's header: range, perms, offset, dev, inode, path
                parts = line.split(maxsplit=5)
                path = parts[5] if len(parts) == 6 else ""
                package = library_package(path)
                if package in HEAVY:
                    files.add(Path(path).name)
            elif key == "Rss:" and package is not None:
                resident[package] = resident.get(package, 0.0) + int(rest.split()[0]) / 1024
    ordered = dict(sorted(resident.items(), key=lambda item: -item[1]))
    return ordered, sorted(files)


def settle(pid: int, timeout: float = 15.0) -> None:
    """Wait until the process tree has kept the same members for a second (decoders start
    beside the workers)."""
    deadline = time.perf_counter() + timeout
    members, since = set(process_tree(pid)), time.perf_counter()
    while time.perf_counter() < deadline and time.perf_counter() - since < 1.0:
        time.sleep(0.1)
        now = set(process_tree(pid))
        if now != members:
            members, since = now, time.perf_counter()


def role_of(tree: Memory, role: str) -> list[Process]:
    return [p for p in tree.processes if p.role == role]


def measure(install: Install, store: str, path: Path, cache: Path) -> Run:
    env = {"CONVSERVE_STORE": str(path), "CONVSERVE_CACHE_DIR": str(cache)}
    if store == "empty":
        env["CONVSERVE_ALLOW_EMPTY"] = "1"
    command = [install.python, "-m", "service", "serve"]
    with Server(env, command=command, cwd=ROOT) as server:
        ready = server.wait_ready()
        settle(server.process.pid)
        tree = memory(server.process.pid)
        model = role_of(tree, MODEL_PROCESS)
        found, files = libraries(model[0].pid) if model else ({}, [])
        listing = httpx.get(server.url + "/models", timeout=10).content
    engines = {f"{m.name} v{v.version}": v.engine or "-"
               for m in msgspec.json.decode(listing, type=ModelList).models
               for v in m.versions}  # fmt: skip
    return Run(store, ready_s=ready, memory=tree, libraries=found, library_files=files,
               engines=engines)  # fmt: skip


def added(run: Run, empty: Run) -> dict[str, float]:
    """Total and model-process RSS and PSS above the empty store's."""
    if run.memory is None or empty.memory is None:
        return {}
    mine, base = role_of(run.memory, MODEL_PROCESS), role_of(empty.memory, MODEL_PROCESS)
    figures = {"total_rss_mb": run.memory.rss_mb - empty.memory.rss_mb,
               "total_pss_mb": run.memory.pss_mb - empty.memory.pss_mb}  # fmt: skip
    if mine and base:
        figures["model_process_rss_mb"] = mine[0].rss_mb - base[0].rss_mb
        figures["model_process_pss_mb"] = mine[0].pss_mb - base[0].pss_mb
    return figures


def prepare_stores(workdir: Path) -> dict[str, Path]:
    bundled = ModelStore(ROOT / "model_store")
    vision = ModelStore(workdir / "resnet18")
    import_torchvision(vision, "resnet18", "resnet18", weights=None)
    both = workdir / "both"
    both.mkdir()
    for store in (bundled, vision):
        for name in store.names():
            (both / name).symlink_to(store.root / name)
    (workdir / "empty").mkdir()
    return {"empty": workdir / "empty", "bundled": bundled.root, "resnet18": vision.root,
            "both": both}  # fmt: skip


def measure_install(python: str, stores: dict[str, Path], cache: Path) -> Install:
    torch_version, problem = probe(python, "torch")
    if torch_version is None:
        return Install(python, "-", None, problem)
    vision, problem = probe(python, "torchvision")
    install = Install(python, torch_version, vision, problem)
    usable = [s for s in STORES if vision is not None or s not in NEEDS_TORCHVISION]
    install.first_start_s = measure(install, usable[-1], stores[usable[-1]], cache).ready_s
    for store in STORES:
        if store not in usable:
            install.runs.append(Run(store, skipped=problem))
            continue
        run = measure(install, store, stores[store], cache)
        install.runs.append(run)
        print(" | ".join(row(install, run)), flush=True)
    empty = install.runs[0]
    for run in install.runs:
        run.added = added(run, empty)
    return install


def pair(rss: float, pss: float) -> str:
    return f"{rss:.0f} / {pss:.0f}" if pss else f"{rss:.0f} / -"


def row(install: Install, run: Run) -> list[str]:
    label = f"torch {install.torch}"
    if run.memory is None or run.ready_s is None:
        return [label, run.store, f"skipped: {run.skipped}"] + ["-"] * 7
    tree = run.memory
    supervisor, model = role_of(tree, SUPERVISOR), role_of(tree, MODEL_PROCESS)
    fronts = ", ".join(f"{p.rss_mb:.0f} ({p.subtree_rss_mb:.0f})" for p in role_of(tree, FRONT))
    more = run.added
    extra = (f"{more['total_pss_mb']:+.0f} / {more.get('model_process_rss_mb', 0.0):+.0f}"
             if more and run.store != "empty" else "-")  # fmt: skip
    heavy = ", ".join(f"{name} {mb:.0f}" for name, mb in run.libraries.items() if name in HEAVY)
    missing = [name for name in ("onnx", "onnxruntime") if name not in run.libraries]
    if missing:
        heavy += "; not loaded: " + ", ".join(missing)
    return [
        label, run.store, f"{run.ready_s:.1f}", str(len(tree.processes)),
        pair(supervisor[0].rss_mb, supervisor[0].pss_mb) if supervisor else "-",
        fronts or "-", pair(model[0].rss_mb, model[0].pss_mb) if model else "-",
        pair(tree.rss_mb, tree.pss_mb), extra, heavy or "-",
    ]  # fmt: skip


def table(installs: list[Install]) -> str:
    rows = [row(install, run) for install in installs for run in install.runs]
    return markdown_table(
        ["install", "store", "ready s", "processes", "supervisor RSS / PSS MB",
         "each front worker RSS MB (with its decoders)", "model process RSS / PSS MB",
         "total RSS / PSS MB", "added vs empty: total PSS / model process RSS MB",
         "model process libraries, resident MB"], rows)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--python", nargs="+", default=[sys.executable],
                        help="interpreters of the installs to measure")  # fmt: skip
    options = parser.parse_args()
    installs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stores = prepare_stores(workdir)
        for index, python in enumerate(options.python):
            installs.append(measure_install(python, stores, workdir / f"cache-{index}"))
    text = table(installs)
    path = write_results("memory", {"installs": [asdict(i) for i in installs]}, text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
