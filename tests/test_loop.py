"""The whole loop of issue 17, once, with real processes and the page in Chromium: a server
with two front workers captures the rotated digits its model is unsure of; a person labels
them on /review; `convserve train --from` fine-tunes a new version on them; it runs in shadow
(the agreement metric moves, and /dashboard shows it), then as a 10% canary, then is promoted;
and on rotated digits nobody labelled it beats the version it came from."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from playwright.sync_api import Page

from tests.support import (
    ARTIFACTS,
    BUNDLED_STORE,
    ServerProcess,
    held_out_digits,
    metric_value,
    png_bytes,
    run_cli,
    running_server,
)
from tests.test_page_browser import chromium

KEY = "loop-key"
AUTH = {"X-API-Key": KEY}
PNG = {"content-type": "image/png"}
ANGLE = 50  # the bundled network saw upright digits only
WAIT_MS = 20_000


def rotated(start: int, stop: int) -> list[tuple[bytes, str]]:
    """Held-out digits start..stop, rotated: (PNG bytes, true label)."""
    digits = held_out_digits(stop)[start:stop]
    return [(png_bytes(d.image.rotate(ANGLE)), str(d.label)) for d in digits]


def classify(server: ServerProcess, bodies: list[bytes], **params: str) -> list[dict[str, object]]:
    def send(body: bytes) -> dict[str, object]:
        response = httpx.post(f"{server.url}/predict", content=body, headers=PNG,
                              params=params, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        answer: dict[str, object] = response.json()
        return answer

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(send, bodies))


def top_label(answer: dict[str, object]) -> str:
    return str(answer["results"][0]["predictions"][0]["label"])  # type: ignore[index]


def version_of(answer: dict[str, object]) -> int:
    return int(answer["model"]["version"])  # type: ignore[index]


def accuracy(server: ServerProcess, sample: list[tuple[bytes, str]], version: str) -> float:
    answers = classify(server, [body for body, _ in sample], version=version)
    return sum(top_label(a) == label for a, (_, label) in zip(answers, sample, strict=True)) / len(
        sample
    )


def captured(folder: Path) -> int:
    """Sidecars the capture has written so far, once the count stops moving."""
    count, give_up = -1, time.monotonic() + 20
    while time.monotonic() < give_up:
        now = len(list(folder.glob("digits/*.json")))
        if now == count and now > 0:
            return now
        count = now
        time.sleep(0.5)
    return count


def manage(server: ServerProcess, method: str, path: str, **json_body: object) -> dict[str, object]:
    response = httpx.request(method, f"{server.url}{path}", headers=AUTH, timeout=120,
                             json=json_body or None)  # fmt: skip
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_capture_label_fine_tune_shadow_canary_promote(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(BUNDLED_STORE / "digits", store / "digits")
    capture = tmp_path / "captured"
    dataset = tmp_path / "captured-labelled" / "digits"  # CONVSERVE_DATASET_DIR's default
    production = rotated(0, 400)  # what users send
    unseen = rotated(400, 600)  # the same style, never captured nor labelled
    truth = {hashlib.sha256(body).hexdigest(): label for body, label in production}
    env = {"CONVSERVE_STORE": str(store), "CONVSERVE_WORKERS": "2", "CONVSERVE_API_KEY": KEY,
           "CONVSERVE_CAPTURE_DIR": str(capture), "CONVSERVE_CAPTURE_BELOW": "0.9",
           "CONVSERVE_CAPTURE_PER_MINUTE": "1000", "CONVSERVE_CACHE_ENTRIES": "0"}  # fmt: skip
    with running_server(tmp_path, env) as server:
        # 1-2. serve with capture on; rotated digits leave the model unsure
        answers = classify(server, [body for body, _ in production])
        assert {version_of(a) for a in answers} == {1}
        waiting = captured(capture)
        assert waiting >= 100, f"only {waiting} of 400 rotated digits were captured"

        # 3. label them on /review, by keyboard: the top guess when right, else the typed label
        with chromium() as browser:
            context = browser.new_context(http_credentials={"username": "me", "password": KEY})
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{server.url}/review")
            labelled = label_everything(page, truth)
            page.screenshot(path=ARTIFACTS / "review-done.png")
            dashboard = context.new_page()
            dashboard.set_default_timeout(WAIT_MS)
            dashboard.goto(f"{server.url}/dashboard?every=1")

            assert labelled >= waiting - 1  # all but the one discarded
            files = list(dataset.glob("*/*.png"))
            assert len(files) == labelled
            assert all(truth[f.stem] == f.parent.name for f in files)
            assert not list(capture.glob("digits/*.json"))  # nothing left to review

            # 4. fine-tune v2 from v1 on what was labelled
            tuned = run_cli("train", "--from", "digits", "--data", dataset, "--epochs", "4",
                            cwd=tmp_path, CONVSERVE_STORE=str(store))  # fmt: skip
            assert tuned.returncode == 0, tuned.stderr
            spec = json.loads((store / "digits" / "2" / "model.json").read_text())
            assert spec["metrics"]["fine_tuned_from"] == "digits:1"

            # 5. shadow: v1 answers everything, v2 runs unseen, the agreement metric moves
            status = manage(server, "PUT", "/models/digits/rollout", version=2, mode="shadow")
            assert status["serving_version"] == 1
            shadowed = classify(server, [body for body, _ in unseen[:100]])
            assert {version_of(a) for a in shadowed} == {1}
            text = wait_for(server, "convserve_shadow_images_total", 100)
            agreed = metric_value(text, "convserve_shadow_agreed_total", version="2")
            assert 0 < agreed < 100, f"v2 agreed with v1 on {agreed} of 100 rotated digits"
            dashboard.wait_for_function(
                "() => parseFloat(document.querySelector('#stat-agreement').textContent) < 100"
            )
            assert "shadow" in (dashboard.text_content("#stat-rollout") or "")
            dashboard.screenshot(path=ARTIFACTS / "dashboard-shadow.png", full_page=True)
            assert not errors, errors

        # 6. canary at 10%: each answer names its version
        manage(server, "PUT", "/models/digits/rollout", version=2, mode="canary", share=0.1)
        upright = [png_bytes(d.image) for d in held_out_digits(300)]
        counts = Counter(version_of(a) for a in classify(server, upright))
        assert abs(counts[2] / 300 - 0.1) <= 0.03, counts

        # 7. promote: every request that names no version gets v2
        promoted = manage(server, "POST", "/models/digits/rollout/promote")
        assert promoted["serving_version"] == 2
        assert {version_of(a) for a in classify(server, upright[:50])} == {2}

        # 8. on rotated digits nobody labelled, the new version is more accurate
        old, new = accuracy(server, unseen[100:], "1"), accuracy(server, unseen[100:], "2")
        assert new >= old + 0.15, (old, new)


def label_everything(page: Page, truth: dict[str, str]) -> int:
    """Work through the review queue as a person at the keyboard would: skip the first image
    (it comes back at the end), discard the second, then label every one; how many filed."""
    filed = 0
    seen: list[str] = []
    while True:
        page.wait_for_function(
            "() => !document.querySelector('#item').hidden"
            " || !document.querySelector('#done').hidden"
        )
        if not page.is_hidden("#done"):
            return filed
        source = page.get_attribute("#picture", "src") or ""
        sha = next(part for part in source.split("/") if len(part) == 64)
        page.wait_for_selector("#guesses button")
        if not seen:
            page.keyboard.press("s")
        elif len(seen) == 1:
            page.keyboard.press("d")
        else:
            label = truth[sha]
            # each guess reads "2. 7 31%": its key, its label, its probability
            guesses = [
                text.split()[1] for text in page.locator("#guesses button").all_text_contents()
            ]
            if guesses[0] == label:
                page.keyboard.press("Enter")  # confirm the top guess
            elif label in guesses:
                page.keyboard.press(str(guesses.index(label) + 1))  # another guess, by its key
            else:
                page.fill("#label", label)  # none of the guesses: type it
                page.press("#label", "Enter")
            filed += 1
        seen.append(sha)
        page.wait_for_function(
            "(sha) => !(document.querySelector('#picture').getAttribute('src') || '').includes(sha)"
            " || !document.querySelector('#done').hidden",
            arg=sha,
        )
        assert len(seen) < 1000, "the queue does not shrink"


def wait_for(server: ServerProcess, name: str, count: int) -> str:
    give_up = time.monotonic() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        if metric_value(text, name) >= count or time.monotonic() > give_up:
            assert metric_value(text, name) >= count, text[-3000:]
            return text
        time.sleep(0.2)
