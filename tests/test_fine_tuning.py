"""`convserve train --from`: the bundled digits network fine-tuned on digits drawn another way
(rotated), through the command a user types, measured against itself on the same held-out
images."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from service.spec import read_spec
from tests.support import BUNDLED_STORE, rotated_digits, run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the bundled store, and an ImageFolder of rotated held-out digits."""
    root = tmp_path_factory.mktemp("tune")
    shutil.copytree(BUNDLED_STORE / "digits", root / "store" / "digits")
    rotated_digits(root / "rotated")
    return root


def tune(workdir: Path, *extra: str) -> tuple[int, str, str]:
    result = run_cli("train", "--from", "digits:1", "--data", workdir / "rotated", "--store",
                     workdir / "store", *extra, cwd=workdir)  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def test_fine_tuning_on_another_style_beats_the_version_it_came_from(workdir: Path) -> None:
    code, out, err = tune(workdir, "--epochs", "4")
    assert code == 0, err
    assert "wrote" in out
    assert "WARNING" not in err
    versions = sorted(int(p.name) for p in (workdir / "store" / "digits").iterdir())
    new = read_spec(workdir / "store" / "digits" / str(versions[-1]) / "model.json")
    old = read_spec(BUNDLED_STORE / "digits" / "1" / "model.json")
    metrics = new.metrics
    assert metrics.fine_tuned_from == "digits:1"
    assert metrics.accuracy is not None
    assert metrics.baseline_accuracy is not None
    assert metrics.samples == 80  # the default holdout, a fifth of 400
    assert metrics.accuracy > metrics.baseline_accuracy + 0.1, metrics
    assert f"held-out accuracy {metrics.accuracy:.4f}" in out
    assert f"digits v1 {metrics.baseline_accuracy:.4f} on the same 80 images" in out
    assert (new.input, new.labels, new.architecture) == (old.input, old.labels, old.architecture)
    assert "fine-tuned" in new.description


def test_frozen_convolutions_stay_as_they_were(workdir: Path) -> None:
    code, _, err = tune(workdir, "--epochs", "1", "--freeze-conv", "--name", "frozen")
    assert code == 0, err
    before = load_file(str(BUNDLED_STORE / "digits" / "1" / "weights.safetensors"))
    after = load_file(str(workdir / "store" / "frozen" / "1" / "weights.safetensors"))
    convs = [key for key in before if key.startswith("conv")]
    assert convs
    assert all(before[key].equal(after[key]) for key in convs)
    assert not all(before[key].equal(after[key]) for key in before if key.startswith("fc"))


def test_a_worse_version_is_written_and_said_loudly(workdir: Path) -> None:
    code, out, err = tune(workdir, "--epochs", "1", "--lr", "0.2", "--name", "wrecked")
    assert code == 0, err
    assert (workdir / "store" / "wrecked" / "1" / "model.json").is_file()
    assert "WARNING: the new version is WORSE than digits v1" in err
    assert "wrote" in out


def test_refusals_say_what_to_do(workdir: Path) -> None:
    odd = workdir / "odd"
    (odd / "cat").mkdir(parents=True)
    (odd / "7").mkdir()
    for folder in ("cat", "7"):
        shutil.copy(next((workdir / "rotated" / "7").iterdir()), odd / folder / "a.png")
    labels = run_cli("train", "--from", "digits", "--data", odd, "--store", workdir / "store",
                     cwd=workdir)  # fmt: skip
    assert labels.returncode == 2
    assert "cat is not a label of digits v" in labels.stderr
    missing = run_cli("train", "--from", "nosuch", "--data", workdir / "rotated", "--store",
                      workdir / "store", cwd=workdir)  # fmt: skip
    assert missing.returncode == 2
    assert "not in the store" in missing.stderr
    mnist = run_cli("train", "--from", "digits", "--store", workdir / "store", cwd=workdir)
    assert mnist.returncode == 2
    assert "--from fine-tunes on --data DIR" in mnist.stderr
