"""Every command in the code blocks of README.md and docs/*.md, run as a reader would, and its
output held to what the doc shows: status, headers, JSON keys and values (probabilities and
other measured floats excepted), plain text.

A live `convserve serve` (127.0.0.1, a free port) serves a temporary copy of the bundled store
with an API key, a fresh one for each document; `localhost:8000` in a command becomes that
server. Commands run from a
temporary folder holding the files the docs assume a reader has (`docs/examples/`, a
`resnet18.pth`, an ImageFolder). `convserve` commands run in this process through
`service.cli.main` (the console script's own entry point: one torch import for all of them,
not one each); every other line runs in bash. In shown output, `...` ends an abbreviated
string, `, ...]` a list that goes on, and `[...]` stands for any value. Commands that cannot
run here are listed in NOT_RUN with the reason; a stale entry fails the test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from tests.support import (
    BUNDLED_STORE,
    ROOT,
    ServerProcess,
    model_files,
    rotated_digits,
    running_server,
)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KEY = "docs-key"
COMMANDS = ("curl", "convserve", "make", "docker", "kubectl", "helm", "export")
NOT_RUN = [  # (what the command line starts with, why it cannot run in a test)
    ("make serve", "starts the server this test starts itself (`convserve serve`)"),
    ("make test", "runs the suite this test belongs to"),
    ("convserve serve [", "a synopsis, not a command line; the test's server is `convserve serve`"),
    ("make docker", "needs a Docker engine: `make docker-test` builds and runs the image"),
    ("docker ", "needs a Docker engine: `make docker-test` runs the image and the compose stack"),
    ("kubectl ", "needs a cluster: tests/test_deploy_k8s.py validates the manifests offline"),
    ("helm ", "needs a cluster and the chart repository"),
    ("export KEY=...", "a placeholder: the server has CONVSERVE_API_KEY and every command KEY"),
]


@dataclass(frozen=True)
class Example:
    where: str  # file:line
    command: str  # as written, continuation lines included
    shown: str  # the output the doc shows after it ("" when it shows none)

    @property
    def skipped_because(self) -> str | None:
        return next((why for start, why in NOT_RUN if self.command.startswith(start)), None)


def code_blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, lines) of each fenced block and each indented block."""
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            yield index + 2, lines[index + 1 : end]
            index = end + 1
        elif line.startswith("    ") and (index == 0 or not lines[index - 1].strip()):
            end = index
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            block = [text[4:] for text in lines[index:end]]
            while block and not block[-1].strip():
                block.pop()
            yield index + 1, block
            index = end
        else:
            index += 1


def _opens(line: str, prompted: bool) -> bool:
    """Whether a block's line starts a command."""
    return line.startswith("$ ") if prompted else line.split()[:1] in ([w] for w in COMMANDS)


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # a quote still open: the command goes on
        return False
    return True


def examples(path: Path) -> Iterator[Example]:
    """The commands of every block that starts with one, each with the lines it shows after
    it. A block with `$ ` prompts has commands only after them; otherwise a line starting with
    a command word starts one and other lines are output; `#` lines are comments."""
    name = path.relative_to(ROOT).as_posix()
    for first, block in code_blocks(path):
        words = [line.split()[0] for line in block if line.strip()]
        prompted = any(line.startswith("$ ") for line in block)
        if not words or (not prompted and words[0] not in COMMANDS):
            continue  # data: JSON, YAML, a layout
        index = 0
        while index < len(block):
            line = block[index]
            starts = (
                line.startswith("$ ") if prompted else line.split()[:1] in ([w] for w in COMMANDS)
            )
            if not starts:
                index += 1
                continue
            start = index
            command = line.removeprefix("$ ")
            while not _complete(command):
                index += 1
                command += "\n" + block[index]
            index += 1
            shown: list[str] = []
            while index < len(block):
                text = block[index]
                opens = (
                    text.startswith("$ ")
                    if prompted
                    else text.split()[:1] in ([w] for w in COMMANDS)
                )
                if opens:
                    break
                if prompted or not text.lstrip().startswith("#"):
                    shown.append(text)
                index += 1
            yield Example(f"{name}:{first + start}", command, "\n".join(shown).strip())


ALL = [example for path in DOCS for example in examples(path)]
RUN = [example for example in ALL if example.skipped_because is None]


def test_every_command_is_run_or_listed_with_its_reason() -> None:
    assert len(RUN) >= 20, [e.where for e in RUN]
    for start, _ in NOT_RUN:
        assert any(e.command.startswith(start) for e in ALL), f"stale NOT_RUN entry {start!r}"
    for path in DOCS:  # a block of another program's commands would go unnoticed
        for first, block in code_blocks(path):
            word = next((line.split()[0] for line in block if line.strip()), "")
            assert word in COMMANDS or word == "$" or not shutil.which(word), (path, first)


# ---- the reader's machine: a server, a store copy, the files the docs assume ----------------


@dataclass
class Reader:
    server: ServerProcess
    store: Path
    home: Path  # the folder commands run in


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder commands run in, with the files every document assumes."""
    home = tmp_path_factory.mktemp("docs") / "home"
    home.mkdir()
    (home / "docs").symlink_to(ROOT / "docs")
    _reader_files(home)
    return home


@pytest.fixture(scope="module")
def readers(
    tmp_path_factory: pytest.TempPathFactory, home: Path
) -> Iterator[Callable[[str], Reader]]:
    """One server and store per document, as a reader of that document alone would start:
    what one page's commands change (a rollout promoted in the README) is not what the next
    page's commands begin with. One server runs at a time."""
    running: dict[str, tuple[Reader, contextlib.ExitStack]] = {}

    def reader_for(document: str) -> Reader:
        if document not in running:
            for _, stack in running.values():
                stack.close()
            running.clear()
            root = tmp_path_factory.mktemp("docs")
            store = root / "store"
            shutil.copytree(BUNDLED_STORE, store)
            env = {
                "CONVSERVE_STORE": str(store),
                "CONVSERVE_API_KEY": KEY,
                "CONVSERVE_LOG_LEVEL": "warning",
            }
            stack = contextlib.ExitStack()
            server = stack.enter_context(running_server(root, env))
            # the management examples load version 2 of digits: in the store, not yet served
            shutil.copytree(store / "digits" / "1", store / "digits" / "2")
            running[document] = (Reader(server, store, home), stack)
        return running[document][0]

    yield reader_for
    for _, stack in running.values():
        stack.close()


@pytest.fixture
def reader(readers: Callable[[str], Reader], request: pytest.FixtureRequest) -> Reader:
    example: Example = request.node.callspec.params["example"]
    return readers(example.where.split(":")[0])


def _reader_files(home: Path) -> None:
    """Files the docs name as the reader's own: weights to import and an ImageFolder."""
    from torchvision.models import resnet18

    from service.registry import build_model, get_architecture

    torch.save(resnet18().state_dict(), home / "resnet18.pth")
    arguments = get_architecture("lenet5").fitted_arguments((1, 28, 28), 10)
    torch.save(build_model("lenet5", arguments).state_dict(), home / "lenet.pth")
    for index, shape in enumerate(("circle", "square")):
        folder = home / "shapes" / shape
        folder.mkdir(parents=True)
        for number in range(12):
            picture = Image.new("RGB", (32, 32), (number * 20, 90, 200 - number * 10))
            box = (6 + number % 4, 6, 24, 24 + number % 5)
            draw = ImageDraw.Draw(picture)
            (draw.ellipse if index == 0 else draw.rectangle)(box, fill=(250, 250, 250))
            picture.save(folder / f"{number}.png")
    (home / "DIR").symlink_to(home / "shapes")  # README's placeholder for an ImageFolder
    (home / "photos").symlink_to(home / "shapes")  # INT8 calibration images
    rotated_digits(home / "rotated", count=100)  # what `train --from digits` fine-tunes on
    # what /review wrote in the README's loop: labelled captures of the digits model
    rotated_digits(home / "captured-labelled" / "digits", count=100)
    model_files(home)  # model.onnx, model.pt, model.pt2, keras.onnx and their labels


@pytest.fixture(scope="module")
def bundled_store_untouched() -> Iterator[None]:
    """No documented command may write into the checkout's own store."""
    before = _listing(BUNDLED_STORE)
    yield
    assert _listing(BUNDLED_STORE) == before, "a documented command wrote into model_store/"


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


# ---- running a command --------------------------------------------------------------------


@dataclass
class Ran:
    code: int
    output: str
    errors: str
    status: int | None = None  # curl: the last answer's status and headers
    headers: dict[str, str] | None = None


def quicker(argv: list[str]) -> list[str]:
    """`convserve train` runs one epoch (on 500 digits of the MNIST sample): the same code
    path at a fraction of the documented twelve epochs' time."""
    if argv[:1] != ["train"]:
        return argv
    return [*argv, "--epochs", "1"] + ([] if "--data" in argv else ["--limit", "500"])


def run_convserve(command: str, reader: Reader) -> Ran:
    from service.cli import main

    argv = quicker(shlex.split(command, comments=True)[1:])
    out, err = io.StringIO(), io.StringIO()
    environ = {**os.environ, "CONVSERVE_STORE": str(reader.store)}
    with (
        contextlib.chdir(reader.home),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        _environment(environ),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("default")  # as a shell runs it: warnings print, they do not raise
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _environment(environ: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_shell(command: str, reader: Reader) -> Ran:
    dump = reader.home / ".headers"
    dump.unlink(missing_ok=True)
    here = command.replace("localhost:8000", reader.server.url.removeprefix("http://"))
    script = f'curl() {{ command curl -sS -D {shlex.quote(str(dump))} "$@"; }}\n{here}'
    environ = {**os.environ, "KEY": KEY}
    done = subprocess.run(["bash", "-c", script], cwd=reader.home, env=environ,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    ran = Ran(done.returncode, done.stdout, done.stderr)
    if dump.exists():
        heads = dump.read_text(errors="replace").strip().split("\r\n\r\n")
        status_line, *fields = heads[-1].splitlines()
        ran.status = int(status_line.split()[1])
        ran.headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return ran


# ---- comparing with what the doc shows ----------------------------------------------------

MORE, ANY = "\x00more", "\x00any"
FLOAT = re.compile(r"-?\d+\.\d+(e-?\d+)?")


def shown_json(text: str) -> Any:
    """The doc's JSON with its ellipses made into markers."""
    text = re.sub(r"\[\s*\.\.\.\s*\]", lambda _: json.dumps(ANY), text)
    text = re.sub(r",\s*\.\.\.(?=\s*[\]}])", lambda _: ", " + json.dumps(MORE), text)
    return json.loads(text)


def same_shape(shown: Any, actual: Any, where: str = "") -> None:
    if shown == ANY:
        return
    if isinstance(shown, dict):
        assert isinstance(actual, dict), where
        assert set(shown) == set(actual), f"{where}: keys {sorted(shown)} != {sorted(actual)}"
        for key, value in shown.items():
            same_shape(value, actual[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(actual, list), where
        items = shown[:-1] if shown and shown[-1] == MORE else shown
        assert len(actual) >= len(items) if items is not shown else len(actual) == len(items), (
            f"{where}: {len(actual)} items, the doc shows {len(shown)}"
        )
        for index, value in enumerate(items):
            same_shape(value, actual[index], f"{where}[{index}]")
    elif isinstance(shown, str):
        assert isinstance(actual, str), where
        if shown.endswith("..."):
            assert actual.startswith(shown[:-3]), f"{where}: {actual!r} is not {shown!r}"
        else:
            assert FLOAT.sub("#", actual) == FLOAT.sub("#", shown), f"{where}: {actual!r}"
    elif isinstance(shown, float):
        assert isinstance(actual, int | float), where
        assert not isinstance(actual, bool), where
    else:  # int, bool, null: exact
        assert actual == shown, f"{where}: {actual!r}"
        assert type(actual) is type(shown), f"{where}: {actual!r}"


def check_shown(example: Example, ran: Ran) -> None:
    body, shown = ran.output, example.shown
    if shown.startswith("HTTP/"):
        head, _, shown = shown.partition("\n\n")
        actual_head, _, body = body.replace("\r\n", "\n").partition("\n\n")
        status_line, *fields = head.splitlines()
        assert actual_head.split()[1] == status_line.split()[1], actual_head
        for field in fields:
            name, _, value = field.partition(":")
            assert ran.headers is not None
            assert name.lower() in ran.headers, name
            if name.lower() == "content-type":
                assert ran.headers[name.lower()] == value.strip()
    if shown.lstrip().startswith(("{", "[")):
        same_shape(shown_json(shown), json.loads(body))
    else:
        assert FLOAT.sub("#", body.strip()) == FLOAT.sub("#", shown), body


@pytest.mark.usefixtures("bundled_store_untouched")
@pytest.mark.parametrize("example", RUN, ids=[example.where for example in RUN])
def test_the_documented_command_does_what_the_doc_shows(example: Example, reader: Reader) -> None:
    if example.command.startswith("convserve "):
        ran = run_convserve(example.command, reader)
    else:
        ran = run_shell(example.command, reader)
    context = f"{example.where}: {example.command}\n{ran.output[-2000:]}\n{ran.errors[-2000:]}"
    assert ran.code == 0, context
    if example.shown:
        check_shown(example, ran)
    elif ran.status is not None:  # a curl whose answer the doc does not show: a success
        assert 200 <= ran.status < 300, context
