"""`convserve predict` as a user runs it (a real `python -m service` process), held to what the
running app answers for the same files: the same top-k for a picture, the same problem detail
for a hostile file, the same heatmap picture size; and its exit statuses, formats and names."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.corpus import UPLOADS, case_bytes
from tests.support import (
    BUNDLED_STORE,
    ROOT,
    digit_picture,
    held_out_digits,
    png_bytes,
    run_cli,
)

EXAMPLES = ROOT / "docs" / "examples"
RAW = {"content-type": "application/octet-stream"}
HOSTILE = [case for case in UPLOADS if not case.get("heavy")]  # the 40 MP one: seconds alone


def _digits(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Held-out digits as ink-on-paper pictures, PNG and JPEG, in nested folders."""
    written = []
    for index, digit in enumerate(held_out_digits(count, seed)):
        where = folder / ("" if index % 3 == 0 else "b" if index % 3 == 1 else "b/c")
        where.mkdir(parents=True, exist_ok=True)
        kind = "png" if index % 2 == 0 else "jpg"
        path = where / f"{index:02d}-{digit.label}.{kind}"
        path.write_bytes(png_bytes(digit_picture(digit), "PNG" if kind == "png" else "JPEG"))
        written.append(path)
    return written


def walked(folder: Path) -> list[Path]:
    """The order the rows must come in: each folder's files by name, then its sub-folders."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    folders = sorted(p for p in folder.iterdir() if p.is_dir())
    return files + [path for sub in folders for path in walked(sub)]


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def csv_predictions(row: dict[str, str]) -> list[dict[str, Any]]:
    """A CSV row's label_1, class_index_1, probability_1, ... as /predict's list."""
    found = []
    rank = 1
    while row.get(f"label_{rank}"):
        found.append({"label": row[f"label_{rank}"],
                      "class_index": int(row[f"class_index_{rank}"]),
                      "probability": float(row[f"probability_{rank}"])})  # fmt: skip
        rank += 1
    return found


def assert_same(rows: list[dict[str, Any]], answered: list[dict[str, Any]]) -> None:
    """The same classes in the same order; the same probabilities to float32 noise (a batch of
    other images may round the last bits of a logit differently)."""
    assert [(p["label"], p["class_index"]) for p in rows] == [
        (p["label"], p["class_index"]) for p in answered
    ]
    assert [p["probability"] for p in rows] == pytest.approx(
        [p["probability"] for p in answered], rel=1e-5, abs=1e-7
    )


async def answer(client: httpx.AsyncClient, data: bytes, **params: str) -> httpx.Response:
    return await client.post("/predict", content=data, headers=RAW, params=params)


# ---- a folder of digits, as CSV -------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """40 digits in nested folders plus a hidden file, an earlier output file inside the
    folder, classified with CONVSERVE_MAX_BATCH_SIZE=8."""
    root = tmp_path_factory.mktemp("digits")
    folder = root / "pictures"
    _digits(folder, 40)
    (folder / ".hidden.png").write_bytes(b"not looked at")
    (folder / "rows.csv").write_text("an earlier run's rows: not an input\n")
    result = run_cli("predict", "pictures", "--model", "digits", "--top-k", "3",
                     "-o", "pictures/rows.csv", "--store", BUNDLED_STORE, cwd=root,
                     CONVSERVE_MAX_BATCH_SIZE="8")  # fmt: skip
    return folder, result


def test_a_folder_is_walked_in_order_into_csv_rows(digits: tuple[Path, Any]) -> None:
    folder, result = digits
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # the rows went to -o; stdout stays clean
    text = (folder / "rows.csv").read_text()
    header = text.splitlines()[0]
    assert header == (
        "path,model,version,label_1,class_index_1,probability_1,label_2,class_index_2,"
        "probability_2,label_3,class_index_3,probability_3,error"
    )
    rows = csv_rows(text)
    expected = [p for p in walked(folder) if p.name != "rows.csv"]
    assert [row["path"] for row in rows] == [str(p.relative_to(folder.parent)) for p in expected]
    assert all(row["model"] == "digits" and row["version"] == "1" for row in rows)
    assert all(row["error"] == "" for row in rows)
    correct = sum(csv_predictions(row)[0]["label"] == row["path"][-5] for row in rows)
    assert correct >= 36  # held-out accuracy ~98%
    summary = result.stderr.strip().splitlines()[-1]
    assert "40 files with digits v1" in summary
    assert "batches of up to 8" in summary
    largest = int(summary.split("largest ")[1].split(")")[0])
    assert 2 <= largest <= 8  # images decoded while a batch ran joined the next one


@pytest.mark.anyio
async def test_csv_rows_equal_the_servers_answers(
    digits: tuple[Path, Any], client: httpx.AsyncClient
) -> None:
    folder, _ = digits
    for row in csv_rows((folder / "rows.csv").read_text()):
        data = (folder.parent / row["path"]).read_bytes()
        response = await answer(client, data, model="digits", top_k="3")
        assert response.status_code == 200
        assert_same(csv_predictions(row), response.json()["results"][0]["predictions"])


# ---- the hostile corpus, as JSON lines --------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Every upload of the hostile corpus as a file (multipart bodies too: as files they are
    just bytes), between two good digits; rows to a .jsonl file."""
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "corpus"
    folder.mkdir()
    for case in HOSTILE:
        (folder / f"{case['name']}.bin").write_bytes(case_bytes(case))
    first, last = (digit_picture(d) for d in held_out_digits(2, seed=1))
    (folder / "!first.png").write_bytes(png_bytes(first))
    (folder / "~last.png").write_bytes(png_bytes(last))
    result = run_cli("predict", "corpus", "--model", "digits", "-o", "rows.jsonl",
                     "--store", BUNDLED_STORE, cwd=root)  # fmt: skip
    return root, result


@pytest.mark.anyio
async def test_each_hostile_file_gets_the_servers_detail_and_the_rest_still_classify(
    hostile: tuple[Path, Any], client: httpx.AsyncClient
) -> None:
    root, result = hostile
    assert result.returncode == 1, result.stderr  # finished, some files failed
    rows = [json.loads(line) for line in (root / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(HOSTILE) + 2
    assert rows[0]["path"] == "corpus/!first.png"
    assert rows[-1]["path"] == "corpus/~last.png"
    failed = 0
    for row in rows:
        assert set(row) == {"path", "model", "version", "predictions", "error"}
        data = (root / row["path"]).read_bytes()
        response = await answer(client, data, model="digits")
        if response.status_code == 200:
            assert row["error"] is None, row
            assert_same(row["predictions"], response.json()["results"][0]["predictions"])
        else:
            failed += 1
            detail = response.json()["detail"]
            assert row["error"] == detail, row["path"]
            assert row["predictions"] == []
            assert f"convserve predict: {row['path']}: {detail}" in result.stderr
    assert failed >= 25  # bombs, truncations, formats not allowed, not images
    assert f"{failed} failed" in result.stderr


# ---- heatmaps ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_heatmaps_are_written_per_file_under_names_that_cannot_collide(
    tmp_path: Path, client: httpx.AsyncClient
) -> None:
    """Two folders each holding x.png; the pictures are the server's heatmap pictures' size."""
    pictures = [digit_picture(d) for d in held_out_digits(3, seed=2)]
    for folder, picture in zip(("left", "right"), pictures, strict=False):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(png_bytes(picture))
    wide = pictures[2].resize((300, 120))  # not square: the overlay keeps the picture's shape
    (tmp_path / "right" / "wide.jpg").write_bytes(png_bytes(wide, "JPEG"))
    result = run_cli("predict", "left", "right", "--heatmap", "gradcam", "--out", "maps",
                     "--format", "jsonl", "--top-k", "1", "--store", BUNDLED_STORE,
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["heatmap"] for row in rows] == [
        "maps/left/x.png.png", "maps/right/wide.jpg.png", "maps/right/x.png.png"
    ]  # fmt: skip
    for row in rows:
        response = await answer(client, (tmp_path / row["path"]).read_bytes(),
                                model="digits", heatmap="gradcam", top_k="1")  # fmt: skip
        served = response.json()["results"][0]
        assert_same(row["predictions"], served["predictions"])
        with Image.open(io.BytesIO(base64.b64decode(served["heatmap"]["png"]))) as expected:
            size = expected.size
        with Image.open(tmp_path / row["heatmap"]) as written:
            assert written.format == "PNG"
            assert written.size == size
            written.verify()


# ---- versions, models, settings and what is refused -------------------------------------------


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose digits model has a version 2: lenet5's files."""
    store = tmp_path_factory.mktemp("versions") / "store"
    shutil.copytree(BUNDLED_STORE / "digits", store / "digits")
    shutil.copytree(BUNDLED_STORE / "lenet5" / "1", store / "digits" / "2")
    return store


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("given", "version", "served_by"), [([], 2, "lenet5"), (["--version", "1"], 1, "digits")]
)
async def test_the_highest_version_unless_one_is_named(
    two_versions: Path, client: httpx.AsyncClient, given: list[str], version: int, served_by: str
) -> None:
    result = run_cli("predict", EXAMPLES, *given, "--format", "jsonl", "--store", two_versions,
                     cwd=two_versions.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(list(EXAMPLES.iterdir()))
    for row in rows:
        assert (row["model"], row["version"]) == ("digits", version)
        response = await answer(client, Path(row["path"]).read_bytes(), model=served_by)
        assert_same(row["predictions"], response.json()["results"][0]["predictions"])


def test_the_servers_limits_apply_to_each_file(tmp_path: Path) -> None:
    """CONVSERVE_FORMATS, CONVSERVE_MAX_BODY_BYTES and CONVSERVE_MAX_PIXELS, as variables and as
    flags; one file in bounds still classifies."""
    Image.new("L", (20, 20), 255).save(tmp_path / "small.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "many-pixels.png")
    noise = Image.effect_noise((100, 100), 80).convert("L")
    noise.save(tmp_path / "big-file.png")
    Image.new("L", (20, 20), 255).save(tmp_path / "photo.jpg")
    result = run_cli("predict", ".", "--max-pixels", "1000", "--store", BUNDLED_STORE,
                     cwd=tmp_path, CONVSERVE_FORMATS="PNG",
                     CONVSERVE_MAX_BODY_BYTES="2000")  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = {row["path"]: row["error"] for row in csv_rows(result.stdout)}
    assert errors["big-file.png"] == (
        "the file exceeds the limit of 2,000 bytes (CONVSERVE_MAX_BODY_BYTES)"
    )
    # Pillow's own bomb guard, set to the limit, refuses it first (as in the server)
    assert errors["many-pixels.png"] == "the PNG image is 1,600 pixels; the limit is 1,000"
    assert errors["photo.jpg"].startswith(
        "the image looks like JPEG (by its first bytes), a format this server does not decode; "
        "allowed formats: PNG (CONVSERVE_FORMATS)"
    )
    assert errors["small.png"] == ""


def test_links_are_followed_and_what_cannot_be_read_has_its_row(tmp_path: Path) -> None:
    """A link to a folder is walked, a link back up is not (the walk would never end); a pipe
    and a dangling link each get a row saying why, and are never waited on."""
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    digit = digit_picture(held_out_digits(1)[0])
    (folder / "a" / "one.png").write_bytes(png_bytes(digit))
    (tmp_path / "elsewhere" / "two.png").write_bytes(png_bytes(digit))
    (folder / "a" / "up").symlink_to("..")
    (folder / "b").symlink_to(tmp_path / "elsewhere")
    (folder / "gone.png").symlink_to("nowhere.png")
    os.mkfifo(folder / "pipe")
    result = run_cli("predict", "in", "--store", BUNDLED_STORE, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    rows = [(row["path"], row["error"]) for row in csv_rows(result.stdout)]
    assert rows == [
        ("in/gone.png", "cannot read the file: No such file or directory"),
        ("in/pipe", "not a regular file (a device, a pipe or a socket)"),
        ("in/a/one.png", ""),
        ("in/b/two.png", ""),
    ]


def _broken_store(root: Path) -> Path:
    """The bundled digits model with its weights file changed after model.json was written."""
    shutil.copytree(BUNDLED_STORE / "digits", root / "digits")
    weights = root / "digits" / "1" / "weights.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    return root


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "nope"], 2,
         f"model 'nope' is not in the store {BUNDLED_STORE}; models there: digits, lenet5"),
        (["--model", "digits", "--version", "9"], 2,
         "model 'digits' has no version 9; versions: 1"),
        (["--heatmap", "gradcam"], 2, "--heatmap writes one picture per file: give --out DIR"),
        (["--out", "maps"], 2, "--out DIR is where heatmaps go: give --heatmap"),
        (["--heatmap", "saliency"], 2, "invalid choice: 'saliency'"),
        (["--top-k", "0"], 2, "--top-k: expected a positive integer, got '0'"),
        (["--format", "xml"], 2, "invalid choice: 'xml'"),
        (["missing.jpg"], 2, "missing.jpg: no such file or folder"),
        (["empty"], 2, "nothing to classify: empty holds no files"),
        (["--max-batch-size", "0"], 2, "--max-batch-size '0' (CONVSERVE_MAX_BATCH_SIZE)"),
        (["--store", "broken", "-o", "rows.csv"], 3,
         "model digits v1: weights.safetensors has sha256"),
    ],
)  # fmt: skip
def test_what_cannot_run_says_why(args: list[str], code: int, message: str, tmp_path: Path) -> None:
    """Exit 2 for what the user got wrong, 3 when the run cannot be done; an earlier -o file is
    left as it was."""
    (tmp_path / "empty").mkdir()
    _broken_store(tmp_path / "broken")
    (tmp_path / "rows.csv").write_text("an earlier run\n")
    paths = [] if any(a in args for a in ("missing.jpg", "empty")) else [str(EXAMPLES)]
    store = [] if "--store" in args else ["--store", str(BUNDLED_STORE)]
    result = run_cli("predict", *paths, *args, *store, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert message in " ".join(result.stderr.split())
    assert result.stdout == ""
    assert (tmp_path / "rows.csv").read_text() == "an earlier run\n"
