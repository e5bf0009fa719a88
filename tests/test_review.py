"""The review page (/review): captured images labelled into an ImageFolder or discarded, behind
the API key, by two front workers, in a real Chromium and through its API."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page

from service.config import Settings
from tests.conftest import ready_client
from tests.support import BUNDLED_STORE, ServerProcess, png_bytes, run_cli, running_server
from tests.test_page_browser import SHOTS, WAIT_MS, chromium

KEY = "review-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBLEM = "application/problem+json"


def noise(seed: int, format: str = "PNG") -> bytes:
    """A picture of nothing: the digits network is unsure of it, so capture keeps it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels), format)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("review")


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[ServerProcess]:
    """Two front workers capturing every image; the dataset dir left to its default."""
    env = {"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_WORKERS": "2",
           "CONVSERVE_API_KEY": KEY, "CONVSERVE_CAPTURE_DIR": str(folder / "captured"),
           "CONVSERVE_CAPTURE_BELOW": "1", "CONVSERVE_CAPTURE_PER_MINUTE": "1000",
           "CONVSERVE_LOG_LEVEL": "warning"}  # fmt: skip
    with running_server(folder, env) as process:
        yield process


def capture(server: ServerProcess, folder: Path, bodies: list[bytes], model: str = "digits"
            ) -> list[str]:  # fmt: skip
    """Send each image once; their sha256s, once the capture has written every one."""
    for body in bodies:
        response = httpx.post(f"{server.url}/models/{model}/predict", content=body,
                              headers={"content-type": "image/png"}, timeout=30)  # fmt: skip
        assert response.status_code == 200, response.text
    shas = [hashlib.sha256(body).hexdigest() for body in bodies]
    give_up = time.monotonic() + 20
    while not all((folder / "captured" / model / f"{sha}.json").exists() for sha in shas):
        assert time.monotonic() < give_up, "the capture did not write the images"
        time.sleep(0.1)
    return shas


def clear(folder: Path) -> None:
    """Start from an empty queue and dataset (the tests share one server)."""
    for path in (folder / "captured", folder / "captured-labelled"):
        shutil.rmtree(path, ignore_errors=True)


def sidecar(folder: Path, sha: str, model: str = "digits") -> dict[str, object]:
    return json.loads((folder / "captured" / model / f"{sha}.json").read_text())  # type: ignore[no-any-return]


def guesses(folder: Path, sha: str) -> list[str]:
    predictions = sidecar(folder, sha)["predictions"]
    assert isinstance(predictions, list)
    return [p["label"] for p in predictions]


def labelled(folder: Path, model: str = "digits") -> dict[str, str]:
    """sha256 -> label of every PNG in the dataset, each checked to be a real PNG."""
    found = {}
    for path in sorted((folder / "captured-labelled" / model).glob("*/*")):
        with Image.open(path) as image:
            assert image.format == "PNG", path
            assert image.size == (28, 28)
        assert path.suffix == ".png"
        found[path.stem] = path.parent.name
    return found


def gone(folder: Path, sha: str, model: str = "digits") -> bool:
    return not list((folder / "captured" / model).glob(f"{sha}*"))


def problem(response: httpx.Response, status: int, slug: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    if slug is not None:
        assert body["type"].endswith(slug), body
    return str(body["detail"])


# ---- the key, and when the page is off -----------------------------------------------------


def test_the_page_asks_a_browser_for_the_key(server: ServerProcess) -> None:
    url = f"{server.url}/review"
    refused = httpx.get(url)
    detail = problem(refused, 401, "unauthorized")
    assert refused.headers["www-authenticate"] == 'Basic realm="convserve review"'
    assert "password" in detail
    for wrong in ({"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}):
        problem(httpx.get(url, headers=wrong), 401)
        problem(httpx.get(f"{url}/items", headers=wrong), 401)
    problem(httpx.get(url, auth=("anyone", "nope")), 401)
    for given in ({"auth": ("anyone", KEY)}, {"headers": AUTH}, {"headers": {"X-API-Key": KEY}}):
        page = httpx.get(url, **given)
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="/static/review.js">' in page.text
    assert httpx.get(f"{url}/items", headers=AUTH).status_code == 200


@pytest.mark.anyio
async def test_off_without_a_key_or_without_capture(client: httpx.AsyncClient) -> None:
    """No key: 403, as management; a key but no capture dir: 404 capture-off."""
    for path in ("/review", "/review/items", f"/review/items/digits/{'0' * 64}/image"):
        detail = problem(await client.get(path, headers=AUTH), 403, "forbidden")
        assert "CONVSERVE_API_KEY" in detail
    settings = Settings.from_env({"CONVSERVE_STORE": str(BUNDLED_STORE), "CONVSERVE_API_KEY": KEY,
                                  "CONVSERVE_MODELS": "digits"})  # fmt: skip
    async with ready_client(settings) as keyed:
        for path in ("/review", "/review/items"):
            detail = problem(await keyed.get(path, headers=AUTH), 404, "capture-off")
            assert "CONVSERVE_CAPTURE_DIR" in detail
        post = await keyed.post(f"/review/items/digits/{'0' * 64}", headers=AUTH,
                                json={"action": "discard"})  # fmt: skip
        problem(post, 404, "capture-off")


def test_the_dataset_may_not_be_in_the_captures_or_the_store(tmp_path: Path) -> None:
    assert Settings(capture_dir=Path("/data/captures")).labelled_dir == Path(
        "/data/captures-labelled"
    )
    cases = [(tmp_path / "captured" / "labelled", "overlaps the capture dir"),
             (BUNDLED_STORE / "labelled", "overlaps the model store")]  # fmt: skip
    for dataset, needle in cases:
        result = run_cli("serve", "--store", BUNDLED_STORE, cwd=tmp_path,
                         CONVSERVE_CAPTURE_DIR=str(tmp_path / "captured"),
                         CONVSERVE_DATASET_DIR=str(dataset))  # fmt: skip
        assert result.returncode == 2
        assert "CONVSERVE_DATASET_DIR" in result.stderr
        assert needle in result.stderr


# ---- the API -------------------------------------------------------------------------------


def test_label_discard_and_what_is_refused(server: ServerProcess, folder: Path) -> None:
    clear(folder)
    jpeg, png, other = noise(100, "JPEG"), noise(101), noise(102)
    shas = capture(server, folder, [jpeg, png, other])
    items = f"{server.url}/review/items"
    listed = httpx.get(items, headers=AUTH, params={"model": "digits"}).json()
    assert listed["labels"] == [str(d) for d in range(10)]
    assert listed["waiting"] == 3
    assert {item["sha256"] for item in listed["items"]} == set(shas)
    first = listed["items"][0]
    assert first["version"] == 1
    assert first["reason"] == "low_confidence"
    assert len(first["predictions"]) == 5
    image = httpx.get(f"{items}/digits/{shas[0]}/image", headers=AUTH)
    assert image.content == jpeg
    assert image.headers["content-type"] == "image/jpeg"
    assert image.headers["x-content-type-options"] == "nosniff"
    heatmap = httpx.get(f"{items}/digits/{shas[0]}/heatmap", headers=AUTH, timeout=30).json()
    assert heatmap["model"] == {"name": "digits", "version": 1}
    assert heatmap["heatmap"]["method"] == "gradcam"
    with Image.open(io.BytesIO(base64.b64decode(heatmap["heatmap"]["png"]))) as o:
        assert o.format == "PNG"
    assert not gone(folder, shas[0])  # looking at it captured nothing and removed nothing
    # refused, each as a problem, and nothing moves
    bad = [
        ("post", f"{items}/digits/{shas[0]}", {"action": "label", "label": "seven"}, 422),
        ("post", f"{items}/digits/{shas[0]}", {"action": "label"}, 422),
        ("post", f"{items}/digits/{shas[0]}", {"action": "keep"}, 422),
        ("post", f"{items}/digits/{shas[0].upper()}", {"action": "discard"}, 422),
        ("post", f"{items}/digits/{shas[0][:12]}", {"action": "discard"}, 422),
        ("post", f"{items}/digits/{'0' * 64}", {"action": "discard"}, 404),
        ("post", f"{items}/nosuch/{shas[0]}", {"action": "label", "label": "1"}, 404),
        ("get", f"{items}/digits/..%2F..%2F..%2Fetc%2Fpasswd/image", None, 404),
        ("get", f"{items}/digits/%2E%2E/image", None, 422),
        ("get", f"{items}/..%2Fcaptured/{shas[0]}/image", None, 404),
        ("get", f"{items}/%2E%2E/{shas[0]}/image", None, 404),
        ("get", f"{items}/digits/{'0' * 64}/image", None, 404),
        ("get", items + "?limit=0", None, 422),
    ]
    for method, url, body, status in bad:
        response = httpx.request(method, url, headers=AUTH, json=body)
        assert response.status_code == status, (url, body, response.text)
        assert response.headers["content-type"] == PROBLEM, url
    assert all(not gone(folder, sha) for sha in shas)
    assert labelled(folder) == {}
    # a JPEG is filed as a PNG of its pixels, a PNG as it came
    for sha, label in ((shas[0], "3"), (shas[1], "8")):
        done = httpx.post(f"{items}/digits/{sha}", headers=AUTH,
                          json={"action": "label", "label": label}, timeout=30)  # fmt: skip
        assert done.status_code == 200, done.text
        assert done.json()["path"].endswith(f"captured-labelled/digits/{label}/{sha}.png")
        assert gone(folder, sha)
    assert (folder / "captured-labelled/digits/8" / f"{shas[1]}.png").read_bytes() == png
    discarded = httpx.post(f"{items}/digits/{shas[2]}", headers=AUTH, json={"action": "discard"})
    assert discarded.status_code == 200
    assert gone(folder, shas[2])
    assert labelled(folder) == {shas[0]: "3", shas[1]: "8"}
    # reviewed already (by another tab, another worker): a clear 404
    again = httpx.post(f"{items}/digits/{shas[0]}", headers=AUTH, json={"action": "discard"})
    assert "reviewed already" in problem(again, 404, "capture-not-found")
    assert httpx.get(items, headers=AUTH).json()["models"] == {}


# ---- the page in Chromium --------------------------------------------------------------------


def shown(page: Page) -> str:
    """The sha256 of the image the page shows, once it shows one."""
    page.wait_for_selector("#item:not([hidden])[data-sha]")
    return page.get_attribute("#item", "data-sha") or ""


def next_shown(page: Page, before: str) -> str:
    page.wait_for_function(
        "(sha) => { const item = document.querySelector('#item');"
        " return item.hidden || item.dataset.sha !== sha; }",
        arg=before,
    )
    return "" if page.is_hidden("#item") else shown(page)


def test_the_page_labels_by_click_and_by_keyboard(server: ServerProcess, folder: Path) -> None:
    clear(folder)
    shas = capture(server, folder, [noise(seed) for seed in range(200, 206)])
    capture(server, folder, [noise(300)], model="lenet5")
    expected: dict[str, str] = {}
    errors: list[str] = []
    with chromium() as browser:
        context = browser.new_context(http_credentials={"username": "x", "password": KEY})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{server.url}/review")
        assert page.is_visible("#model")  # captures of two models: a picker
        page.select_option("#model", "digits")
        page.wait_for_function(
            "() => document.querySelector('#left').textContent.startsWith('6 images left')"
        )
        assert "1 for other models" in (page.text_content("#left") or "")
        page.wait_for_function("() => document.querySelector('#overlay').naturalWidth > 0")
        assert "Grad-CAM" in (page.get_attribute("#overlay", "alt") or "")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SHOTS / "review.png", full_page=True)
        # 1. click Confirm: the top guess
        sha = shown(page)
        expected[sha] = guesses(folder, sha)[0]
        page.click("#confirm")
        # 2. the keyboard: 2 picks the second guess
        sha = next_shown(page, sha)
        expected[sha] = guesses(folder, sha)[1]
        page.keyboard.press("2")
        # 3. Enter confirms the top guess
        sha = next_shown(page, sha)
        expected[sha] = guesses(folder, sha)[0]
        page.keyboard.press("Enter")
        # 4. a label outside the guesses, typed (s and d are letters there, not shortcuts)
        sha = next_shown(page, sha)
        other = next(str(d) for d in range(10) if str(d) not in guesses(folder, sha))
        page.fill("#label", other)
        page.keyboard.press("Enter")
        expected[sha] = other
        # 5. S skips (the image stays), D discards
        sha = next_shown(page, sha)
        skipped = sha
        page.locator("#item-title").focus()
        page.keyboard.press("s")
        sha = next_shown(page, sha)
        page.keyboard.press("d")
        discarded = sha
        # the skipped one comes back once nothing else waits
        assert next_shown(page, sha) == skipped
        page.wait_for_function(
            "() => document.querySelector('#left').textContent.startsWith('1 image left')"
        )
        # a mistake is shown as the service's problem
        page.fill("#label", "not-a-digit")
        page.click("#file-label")
        page.wait_for_selector("#error:not([hidden])")
        assert "Invalid parameter: label 'not-a-digit'" in (page.text_content("#error") or "")
        expected[skipped] = guesses(folder, skipped)[0]
        page.click("button.guess >> nth=0")
        page.wait_for_selector("#item", state="hidden")
        page.wait_for_function(
            "() => document.querySelector('#left').textContent.startsWith('0 images left')"
        )
        context.close()
    assert not errors, errors
    assert labelled(folder) == expected
    assert set(expected) | {discarded} == set(shas)
    assert all(gone(folder, sha) for sha in shas)
    assert all(label.isdigit() for label in expected.values())
    assert sorted(p.name for p in (folder / "captured-labelled" / "digits").iterdir()) == sorted(
        set(expected.values())
    )  # an ImageFolder: one folder per label, named as the model's labels
