"""Settings a new user can trust: every command reads its CONVSERVE_* variables, flags win,
bad values and typos are named with both spellings, and a store that cannot serve stops
start-up with one line instead of a server that is ready with nothing to serve."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service import __version__
from service.config import Settings, env_name, flag_name
from tests.support import BUNDLED_STORE, ROOT, free_port, running_server

CONVSERVE = [sys.executable, "-m", "service"]


def run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The real command, with only the given CONVSERVE_* variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    return subprocess.run(
        [*CONVSERVE, *args], env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A usage error: exit 2, one line on stderr naming every needle, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


@pytest.mark.parametrize(
    ("env", "args", "needles"),
    [
        (
            {"CONVSERVE_MAX_BATCH_SIZE": "abc"},
            [],
            ["CONVSERVE_MAX_BATCH_SIZE", "--max-batch-size", "whole number"],
        ),
        ({}, ["--port", "99999"], ["--port '99999'", "CONVSERVE_PORT", "0..65535"]),
        ({"CONVSERVE_WATCH_INTERVAL_S": "soon"}, [], ["--watch-interval-s", "a number >= 0"]),
        (
            {"CONVSERVE_STORE": "/nonexistent"},
            [],
            [
                "CONVSERVE_STORE='/nonexistent'",
                "--store",
                "there is no directory /nonexistent",
                "CONVSERVE_ALLOW_EMPTY",
            ],
        ),
        (
            {"CONVSERVE_DEFAULT_MODEL": "nosuch"},
            [],
            ["CONVSERVE_DEFAULT_MODEL='nosuch'", "--default-model", "digits, lenet5"],
        ),
        (
            {"CONVSERVE_MODELS": "digits,nosuch"},
            [],
            ["CONVSERVE_MODELS", "nosuch", "models there: digits, lenet5"],
        ),
        (
            {"CONVSERVE_MODELS": "lenet5"},
            ["--default-model", "digits"],
            ["--default-model", "(lenet5)"],
        ),
    ],
    ids=["bad-int", "bad-flag", "bad-float", "no-store", "no-default", "no-model", "not-served"],
)
def test_serve_refuses_what_cannot_work_in_one_line(
    env: dict[str, str], args: list[str], needles: list[str]
) -> None:
    message = refused(run(["serve", *args], env), *needles)
    assert "invalid literal" not in message
    assert len(message.strip().splitlines()) == 1, message


def test_an_empty_store_needs_watching_or_an_explicit_allowance(tmp_path: Path) -> None:
    empty = {"CONVSERVE_STORE": str(tmp_path)}
    refused(run(["serve"], empty), "the store has no models", "CONVSERVE_WATCH=1")
    allowed = {**empty, "CONVSERVE_STORE": str(tmp_path / "later"), "CONVSERVE_ALLOW_EMPTY": "1",
               "CONVSERVE_WORKERS": "1"}  # fmt: skip
    with running_server(tmp_path, allowed) as server:
        assert httpx.get(f"{server.url}/health/live").status_code == 200
        assert httpx.get(f"{server.url}/models").json()["models"] == []


def test_the_default_store_is_the_current_directorys(tmp_path: Path) -> None:
    message = refused(run(["serve"], cwd=tmp_path), "CONVSERVE_STORE='model_store'")
    assert str(tmp_path) in message  # where the relative path was looked for
    shutil.copytree(BUNDLED_STORE / "lenet5", tmp_path / "model_store" / "lenet5")
    with running_server(tmp_path, {"CONVSERVE_WORKERS": "0"}, cwd=tmp_path) as server:
        names = [m["name"] for m in httpx.get(f"{server.url}/models").json()["models"]]
        assert names == ["lenet5"]


def test_a_misspelled_variable_is_named_with_the_closest_setting() -> None:
    result = run(["describe", "--list"], {"CONVSERVE_MAX_BATCHSIZE": "8"})
    assert result.returncode == 0
    assert "CONVSERVE_MAX_BATCHSIZE is not a convserve setting" in result.stderr
    assert "did you mean CONVSERVE_MAX_BATCH_SIZE?" in result.stderr


def test_version_and_help_show_every_flag_its_default_and_its_variable() -> None:
    version = run(["--version"])
    assert version.returncode == 0
    assert version.stdout.strip() == f"convserve {__version__}"
    usage = run(["serve", "--help"]).stdout
    text = " ".join(usage.split())  # argparse wraps lines
    for field in dataclasses.fields(Settings):
        assert flag_name(field.name) in usage, field.name
        assert env_name(field.name) in text, field.name
    assert text.count("(default: ") >= len(dataclasses.fields(Settings))
    for switch in (
        "--watch, --no-watch",
        "--warmup, --no-warmup",
        "--allow-empty, --no-allow-empty",
    ):
        assert switch in usage, switch


def test_switches_and_flags_override_the_environment() -> None:
    from service.cli import build_parser, settings_from

    args = build_parser().parse_args(["serve", "--no-warmup", "--watch", "--max-batch-size", "4"])
    os_env = {"CONVSERVE_WARMUP": "1", "CONVSERVE_WATCH": "0", "CONVSERVE_MAX_BATCH_SIZE": "9"}
    saved = {k: os.environ.get(k) for k in os_env}
    os.environ.update(os_env)
    try:
        settings = settings_from(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert (settings.warmup, settings.watch, settings.max_batch_size) == (False, True, 4)


def test_import_train_and_explain_read_the_store_from_the_environment(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {"CONVSERVE_STORE": str(store), "CONVSERVE_CACHE_DIR": str(tmp_path / "cache")}
    made = run(["import", "small_cnn", "--random-init", "--name", "imported"], env)
    assert made.returncode == 0, made.stderr
    assert (store / "imported" / "1" / "model.json").is_file()
    trained = run(["train", "--name", "trained", "--epochs", "1", "--limit", "300"], env)
    assert trained.returncode == 0, trained.stderr
    assert (store / "trained" / "1" / "model.onnx").is_file()  # derived files come with it
    # the engine is decided for this machine now, so the first start finds it recorded
    assert len(list((tmp_path / "cache" / "engines").glob("*.json"))) == 2
    assert "engine on this machine:" in trained.stdout
    output = tmp_path / "out.png"
    image = str(ROOT / "docs" / "examples" / "digit-4.jpg")
    chosen = {**env, "CONVSERVE_DEFAULT_MODEL": "trained"}  # not the first name in the store
    explained = run(["explain", image, "-o", str(output)], chosen)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("trained v1")
    pngs_only = run(["explain", image, "-o", str(output)], {**chosen, "CONVSERVE_FORMATS": "PNG"})
    assert pngs_only.returncode == 1
    assert "CONVSERVE_FORMATS" in pngs_only.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (BUNDLED_STORE / "trained").exists()
    assert not (BUNDLED_STORE / "imported").exists()


def test_a_store_whose_model_cannot_load_is_not_logged_as_ready(tmp_path: Path) -> None:
    """Start-up loading ends, readiness stays 503, and the log says so instead of 'ready'."""
    shutil.copytree(BUNDLED_STORE / "digits", tmp_path / "store" / "digits")
    weights = tmp_path / "store" / "digits" / "1" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")  # no longer the recorded sha256
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONVSERVE_")}
    env = {**clean, "CONVSERVE_STORE": str(tmp_path / "store"), "CONVSERVE_PORT": str(port),
           "CONVSERVE_GRPC_PORT": "0", "CONVSERVE_WORKERS": "0",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        server = subprocess.Popen([*CONVSERVE, "serve"], env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 60
        while "NOT ready" not in log.read_text() and time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert "NOT ready: no version of digits serves" in text
        assert "ready in" not in text
        while time.monotonic() < deadline:  # without torch the log can come before the listener
            with contextlib.suppress(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/health/live")
                break
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 503
    finally:
        server.terminate()
        server.wait(30)
