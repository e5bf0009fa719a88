"""The pages in a real headless Chromium (Debian's, driven by Playwright) against a live server.

Screenshots land in artifacts/page/ for people to look at.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Request, sync_playwright

from tests.support import (
    ARTIFACTS,
    ServerProcess,
    digit_picture,
    graph_torch_cannot_run,
    held_out_digits,
    metric_value,
    png_bytes,
    run_cli,
    running_server,
)

CHROMIUM = os.environ.get("CONVSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the networking switches Chromium phones home at start-up (refused on closed networks).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ARTIFACTS / "page"
WAIT_MS = 20_000
PAD = 280  # the drawing pad's own pixels


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("page")
    env = {"CONVSERVE_LOG_LEVEL": "warning", "CONVSERVE_CAPTURE_DIR": str(folder / "captured"),
           "CONVSERVE_CAPTURE_RATE": "0.5"}  # fmt: skip
    with running_server(folder, env) as process:
        yield process


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium from the system (no browser download), closed afterwards."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install it (apt-get install chromium; .ci/run "
            "does) or point CONVSERVE_CHROMIUM at a Chromium binary"
        )
    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary --user-data-dir
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    SHOTS.mkdir(parents=True, exist_ok=True)
    with chromium() as launched:
        yield launched


Open = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser, server: ServerProcess) -> Iterator[Open]:
    """Open a path of the live server in a fresh browser context; after the test, check that
    the page made no request outside the server and raised no script error."""
    contexts = []
    outside: list[str] = []
    errors: list[str] = []

    def open_(path: str = "/", width: int = 1280, height: int = 1000) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on(
            "request",
            lambda r: (
                None if r.url.startswith((server.url, "data:", "blob:")) else outside.append(r.url)
            ),
        )
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + path)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not outside, f"requests outside the service: {outside}"
    assert not errors, f"script errors: {errors}"


def dims(*sizes: int) -> str:
    """A shape as the pages write it, with multiplication signs between the sizes."""
    return "\N{MULTIPLICATION SIGN}".join(str(size) for size in sizes)


def digit_file(tmp_path: Path, index: int) -> tuple[Path, str]:
    """A held-out digit, enlarged and written dark on light like ink on paper, as a PNG file."""
    digit = held_out_digits(index + 1)[index]
    path = tmp_path / f"digit-{index}-{digit.label}.png"
    digit_picture(digit, 224).save(path)
    return path, str(digit.label)


def models_loaded(page: Page) -> None:
    page.wait_for_selector("#model:not([disabled])")
    page.wait_for_selector("#card-table tbody tr")


def lenet_card_shown(page: Page) -> None:
    """Wait for the lenet5 card itself: the digits card also has a conv1 row."""
    page.wait_for_function(
        "() => document.querySelector('#card-facts').textContent.includes('lenet5')"
    )
    page.wait_for_selector("#card-table tbody tr >> text=conv1")


def image_shown(page: Page, selector: str) -> bool:
    return bool(
        page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0 && !!img.src")
    )


def upload(page: Page, path: Path, label: str) -> None:
    page.set_input_files("#file", path)
    page.wait_for_selector(f'#summary[data-top="{label}"]')


def draw(page: Page, points: list[tuple[int, int]]) -> None:
    """One stroke through `points`, given in the pad's own 280x280 pixels."""
    pad = page.locator("#pad")
    pad.scroll_into_view_if_needed()  # raw mouse events land where the viewport shows the pad
    box = pad.bounding_box()
    assert box is not None

    def to_page(x: int, y: int) -> tuple[float, float]:
        return box["x"] + x * box["width"] / PAD, box["y"] + y * box["height"] / PAD

    page.mouse.move(*to_page(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*to_page(*point), steps=8)
    page.mouse.up()


def number(page: Page, selector: str) -> float:
    value = page.get_attribute(selector, "data-value")
    assert value is not None, selector
    return float(value)


def check_step_through(page: Page) -> None:
    """The page's own arithmetic: sum of products + bias equals the service's map value."""
    page.wait_for_selector("#step-sum")
    total, bias = number(page, "#step-sum"), number(page, "#step-bias")
    assert total + bias == pytest.approx(number(page, "#step-pre"), abs=1e-6)
    assert number(page, "#step-pre") == pytest.approx(number(page, "#step-map-value"), abs=1e-4)
    assert number(page, "#step-post") == pytest.approx(max(total + bias, 0.0), abs=1e-4)


# ---- the try-it page -------------------------------------------------------------------------


def test_upload_a_digit_shows_its_class_and_heatmap(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)
    for index in (0, 1, 2):
        path, label = digit_file(tmp_path, index)
        upload(page, path, label)
        assert page.text_content("#predictions li .label") == label
        assert page.locator("#predictions li").count() == 5
        page.wait_for_function("() => document.querySelector('#gradcam').naturalWidth > 0")
        assert image_shown(page, "#gradcam")
        assert "Grad-CAM heatmap for class" in (page.get_attribute("#gradcam", "alt") or "")
        assert page.is_visible("#gradcam")
    summary = page.text_content("#summary") or ""
    assert summary.startswith(f"digits v1 says {label} with")
    # the model card beside it: the layer table from the live network
    conv1 = page.locator("#card-table tbody tr", has_text="conv1").first
    assert conv1.locator("td").all_text_contents()[2:5] == [dims(32, 28, 28), "320", "225,792"]
    assert page.locator("#card-table tfoot td").nth(3).text_content() == "421,642"
    page.wait_for_selector("#kernels .tile >> nth=31")
    assert page.locator("#kernels .tile").count() == 32
    check_step_through(page)
    page.screenshot(path=SHOTS / "upload.png", full_page=True)
    page.screenshot(
        path=SHOTS / "readme.png",
        full_page=True,
        clip={"x": 0, "y": 0, "width": 1280, "height": 1130},
    )


def test_draw_a_digit_on_the_canvas(open_page: Open) -> None:
    page = open_page("/")
    models_loaded(page)
    assert page.is_visible("#pad")
    draw(page, [(140, 40), (140, 240)])
    page.wait_for_selector('#summary[data-top="1"]')
    page.click("#clear")
    draw(page, [(70, 60), (210, 60), (120, 240)])
    page.wait_for_selector('#summary[data-top="7"]')
    assert image_shown(page, "#preview")
    assert image_shown(page, "#gradcam")
    page.screenshot(path=SHOTS / "drawn-7.png", full_page=True)


def test_switch_layers_walks_the_conv_layers(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)
    path, label = digit_file(tmp_path, 0)
    upload(page, path, label)
    radios = page.locator('input[name="layer"]')
    assert [radios.nth(i).get_attribute("value") for i in range(radios.count())] == [
        "conv1",
        "conv2",
    ]
    page.wait_for_selector('#activation[data-layer="conv1"]')
    first = page.get_attribute("#activation", "src")
    assert f"32 maps of {dims(28, 28)}" in (page.text_content("#activation-caption") or "")
    page.check('input[name="layer"][value="conv2"]')
    page.wait_for_selector('#activation[data-layer="conv2"]')
    assert page.get_attribute("#activation", "src") != first
    assert image_shown(page, "#activation")
    assert f"64 maps of {dims(14, 14)}" in (page.text_content("#activation-caption") or "")
    # the explainer follows its own layer picker
    page.select_option("#conv-layer", "conv2")
    page.wait_for_selector("#kernels .tile >> nth=63")
    assert f"64 kernels of {dims(32, 3, 3)}" in (page.text_content("#conv-facts") or "")
    check_step_through(page)
    page.screenshot(path=SHOTS / "layer-conv2.png", full_page=True)


def test_step_through_any_position(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)
    page.select_option("#model", "lenet5")
    lenet_card_shown(page)
    path, label = digit_file(tmp_path, 1)
    upload(page, path, label)
    page.wait_for_selector("#maps .tile >> nth=5")
    assert page.locator("#kernels .tile").count() == 6
    page.click('#maps .tile[data-channel="4"]')
    assert page.get_attribute('#maps .tile[data-channel="4"]', "aria-pressed") == "true"
    # relative to the map itself: Playwright scrolls it into view and waits until it is still
    page.locator("#step-map").click(position={"x": 3, "y": 3})  # a corner
    assert (page.input_value("#step-row"), page.input_value("#step-col")) == ("0", "0")
    assert page.locator("#step table.patch td.pad").count() == 16  # 5x5, padding 2: 9 inside
    check_step_through(page)
    page.fill("#step-row", "14")
    page.fill("#step-col", "13")
    page.press("#step-col", "Enter")
    page.wait_for_function("() => document.querySelector('#step p').textContent.includes('14')")
    assert page.locator("#step td.pad").count() == 0
    assert page.locator("#step table.products td").count() == 25
    check_step_through(page)


def test_errors_are_shown_in_plain_words(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)
    path, label = digit_file(tmp_path, 0)
    upload(page, path, label)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page.set_input_files("#file", notes)
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "text/plain is not accepted" in (alert.text_content() or "")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    page.set_input_files("#file", broken)
    page.wait_for_function(
        "() => document.querySelector('#error').textContent.includes('cannot identify an image')"
    )
    text = alert.text_content() or ""
    assert text.startswith("Invalid image: cannot identify an image in the 16 bytes sent")
    assert page.is_visible("#model")  # the page itself stays usable
    assert page.is_hidden("#results")  # no answer about an earlier image is left on show
    page.screenshot(path=SHOTS / "error.png")
    path, label = digit_file(tmp_path, 1)
    upload(page, path, label)
    assert page.is_hidden("#error")
    assert page.is_visible("#results")


def test_a_model_without_heatmaps_is_classified_and_says_why(
    browser: Browser, tmp_path: Path
) -> None:
    """An imported graph torch cannot run: the page classifies with it, asks for no heatmap,
    and says in plain words why there is none."""
    graph = tmp_path / "pooled.onnx"
    graph_torch_cannot_run(graph)
    store = tmp_path / "store"
    imported = run_cli("import", graph, "--name", "pooled", "--store", store, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    with running_server(tmp_path, {"CONVSERVE_STORE": str(store)}) as server:
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        refused: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("response", lambda r: refused.append(r.url) if r.status >= 400 else None)
        page.goto(server.url + "/")
        models_loaded(page)
        picture = tmp_path / "red.png"
        Image.new("RGB", (64, 48), (200, 30, 40)).save(picture)
        page.set_input_files("#file", picture)
        page.wait_for_selector("#summary[data-top]")
        assert (page.text_content("#summary") or "").startswith("pooled v1 says class")
        assert page.is_hidden("#gradcam")
        caption = page.text_content("#gradcam-caption") or ""
        assert caption.startswith("No heatmaps for this model: onnx2torch has no converter")
        assert "GlobalMaxPool" in caption
        assert page.text_content("#activation-caption") == "This model has no layers to walk."
        assert page.is_hidden("#error")
        page.screenshot(path=SHOTS / "no-heatmaps.png", full_page=True)
        context.close()
    assert not errors, f"script errors: {errors}"
    assert not refused, f"refused requests: {refused}"


def test_keyboard_only(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)

    def tab_to(selector: str) -> None:
        for _ in range(60):
            page.keyboard.press("Tab")
            if page.evaluate("s => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"Tab never reached {selector}")

    # A listener from the start has Chromium intercept file choosers well before the key press
    # opens one: turned on only by expect_file_chooser, interception can lose that race.
    page.on("filechooser", lambda _: None)
    tab_to("#model")
    page.keyboard.press("ArrowDown")
    assert page.input_value("#model") == "lenet5"
    lenet_card_shown(page)
    tab_to("#file")
    path, label = digit_file(tmp_path, 2)
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(path)
    page.wait_for_selector(f'#summary[data-top="{label}"]')
    assert (page.text_content("#summary") or "").startswith("lenet5 v1 says")
    tab_to('input[name="layer"]')
    page.keyboard.press("ArrowDown")
    page.wait_for_selector('#activation[data-layer="conv2"]')
    tab_to("#step-map")
    row = page.input_value("#step-row")
    page.keyboard.press("ArrowDown" if row == "0" else "ArrowUp")
    assert page.input_value("#step-row") != row
    check_step_through(page)
    # drawing with the keyboard: Space puts the pen down, arrows draw, Space lifts and classifies
    tab_to("#pad")
    for key in ["ArrowUp"] * 9 + ["Space"] + ["ArrowDown"] * 18 + ["Space"]:
        page.keyboard.press(key)
    page.wait_for_selector('#summary[data-top="1"]')


def test_labels_for_screen_readers(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/")
    models_loaded(page)
    path, label = digit_file(tmp_path, 0)
    upload(page, path, label)
    page.wait_for_selector("#step-sum")
    named = [
        page.get_by_role("combobox", name="Model", exact=True),
        page.get_by_role("combobox", name="Version", exact=True),
        page.get_by_role("spinbutton", name="Top classes", exact=True),
        page.get_by_role("button", name="Choose an image", exact=True),
        page.get_by_role("combobox", name="Layer", exact=True),
        page.get_by_role("spinbutton", name="Map", exact=True),
        page.get_by_role("spinbutton", name="Row", exact=True),
        page.get_by_role("spinbutton", name="Column", exact=True),
        page.get_by_role("button", name="Classify the drawing", exact=True),
        page.get_by_role("radio", name=f"conv1 {dims(32, 28, 28)}"),
    ]
    for locator in named:
        assert locator.count() == 1, locator
    assert page.get_by_role("application", name="Drawing pad").count() == 1
    assert page.get_attribute("#summary", "aria-live") == "polite"
    assert page.get_attribute("#status", "role") == "status"
    assert page.get_attribute("#error", "role") == "alert"
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, select, input, [tabindex]')]
          .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                    && !e.textContent.trim() && !e.getAttribute('aria-labelledby'))
          .map(e => e.outerHTML)"""
    )
    assert unnamed == []


def test_phone_width(open_page: Open, tmp_path: Path) -> None:
    page = open_page("/", width=375, height=812)
    models_loaded(page)
    path, label = digit_file(tmp_path, 0)
    upload(page, path, label)
    page.wait_for_selector("#step-sum")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for selector in ("#gradcam", "#pad", "#predictions", ".table-scroll", "#step"):
        box = page.locator(selector).bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= 375, selector
    page.screenshot(path=SHOTS / "phone.png", full_page=True)
    dashboard = open_page("/dashboard", width=375, height=812)
    dashboard.wait_for_selector("#chart-rate svg")
    assert dashboard.evaluate("document.documentElement.scrollWidth") <= 375


def test_the_page_sends_each_image_once(open_page: Open, tmp_path: Path) -> None:
    """One image goes up once: its heatmaps, the explorer, another layer, another top-k and
    another model name it by the id the service keeps it under (any worker finds it)."""
    page = open_page("/")
    models_loaded(page)
    posts: list[tuple[str, str]] = []  # (url, content type): only a request with a body has one

    def note(sent: Request) -> None:
        if sent.method == "POST":
            posts.append((sent.url, sent.headers.get("content-type", "")))

    page.on("request", note)
    path, label = digit_file(tmp_path, 3)
    upload(page, path, label)
    page.wait_for_selector('#activation[data-layer="conv1"]')
    page.wait_for_selector("#step-sum")  # the explorer has its maps
    page.check('input[name="layer"][value="conv2"]')
    page.wait_for_selector('#activation[data-layer="conv2"]')
    with page.expect_response(lambda r: "/layers/conv2/maps" in r.url) as maps:
        page.select_option("#conv-layer", "conv2")
    assert maps.value.status == 200
    page.fill("#top-k", "3")
    page.dispatch_event("#top-k", "change")
    page.wait_for_function("() => document.querySelectorAll('#predictions li').length === 3")
    with page.expect_response(lambda r: "model=lenet5" in r.url and "gradcam" in r.url) as other:
        page.select_option("#model", "lenet5")
    assert other.value.status == 200
    sent = [url for url, kind in posts if kind.startswith("image/")]
    named = [url for url, kind in posts if not kind]
    assert len(sent) == 1, posts
    assert "keep=true" in sent[0]
    assert sent[0] == posts[0][0]  # the first request carried it
    assert len(named) >= 6, posts
    assert all("image=" in url for url in named), named


# ---- the dashboard ---------------------------------------------------------------------------


class Load:
    """Clients posting digits (and a few bad bodies) to the server from threads until stopped."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sent = 0
        self.digits = [np.asarray(d.image) for d in held_out_digits(16)]
        self.again = png_bytes(held_out_digits(1)[0].image)  # sent again and again: cache hits
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def body(self, count: int) -> bytes:
        """A bad body in ten, one image sent again in three, new images otherwise (each its
        own bytes: one marked pixel, so the response cache cannot answer it)."""
        if count % 10 == 0:
            return b"broken"
        if count % 3 == 0:
            return self.again
        pixels = self.digits[count % 16].copy()
        pixels[0, :3] = (count % 256, count // 256 % 256, count // 65536 % 256)
        return png_bytes(Image.fromarray(pixels))

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                self.sent += 1
                body = self.body(self.sent)
                client.post("/predict", content=body, headers={"content-type": "image/png"})

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def legend(page: Page, chart: str, key: str) -> str:
    return page.text_content(f'#chart-{chart} .legend li[data-key="{key}"]') or ""


def path_of(page: Page, chart: str, key: str) -> str:
    return page.get_attribute(f'#chart-{chart} path[data-key="{key}"]', "d") or ""


def readings(page: Page) -> int:
    return int(page.get_attribute("#updated", "data-readings") or 0)


def test_dashboard_moves_under_load(open_page: Open, server: ServerProcess) -> None:
    page = open_page("/dashboard?every=1")
    with Load(server.url):
        page.wait_for_function(
            "() => Number(document.querySelector('#updated').dataset.readings) >= 2"
        )
        page.wait_for_function(
            "() => parseFloat(document.querySelector('#stat-rate').textContent) > 0"
        )
        before = {key: path_of(page, "rate", key) for key in ("rate", "images")}
        count = readings(page)
        page.wait_for_function(
            f"() => Number(document.querySelector('#updated').dataset.readings) >= {count + 2}"
        )
        after = {key: path_of(page, "rate", key) for key in ("rate", "images")}
        assert after["rate"] != before["rate"]
        assert after["rate"].count("L") > before["rate"].count("L")  # the line grew
        assert after["images"] != before["images"]
        page.wait_for_selector("#chart-sizes rect")
        page.screenshot(path=SHOTS / "dashboard.png", full_page=True)
        for key in ("p50", "p95", "p99"):
            assert " ms" in legend(page, "latency", key), key
        assert " ms" in legend(page, "stages", "queue")
        assert " ms" in legend(page, "stages", "inference")
        assert float(legend(page, "errors", "errors4xx").split(": ")[1].split()[0]) > 0
        assert float(page.text_content("#stat-batch") or "0") >= 1
        bars = page.eval_on_selector_all(
            "#chart-sizes rect", "rects => rects.map(r => Number(r.getAttribute('height')))"
        )
        assert max(bars) > 0
        assert "In flight" in (page.text_content(".stats") or "")
        assert float(legend(page, "cache", "hits").split(": ")[1].split()[0]) > 0
        assert float(legend(page, "cache", "misses").split(": ")[1].split()[0]) > 0
        assert (page.text_content("#stat-cache") or "").endswith("%")
        page.wait_for_function(
            "() => parseFloat(document.querySelector('#stat-captured').textContent) > 0"
        )
        assert "/min" in legend(page, "capture", "captured")
    latencies = [path_of(page, "latency", key) for key in ("p50", "p95", "p99")]
    assert all(latencies), latencies


def test_dashboard_arithmetic_agrees_with_prometheus(
    open_page: Open, server: ServerProcess
) -> None:
    """The page's histogram_quantile and its reading of /metrics, checked on known numbers."""
    page = open_page("/dashboard")
    text = httpx.get(f"{server.url}/metrics").text
    results = page.evaluate(
        """async (text) => {
          const m = await import('/static/metrics.js');
          const inf = Infinity;
          const scrape = new m.Scrape(m.parseMetrics(text), 0);
          return {
            half: m.quantile(0.5, [[0.001, 0], [0.002, 10], [0.005, 20], [inf, 20]]),
            threeQuarters: m.quantile(0.75, [[0.001, 0], [0.002, 10], [0.005, 20], [inf, 20]]),
            beyond: m.quantile(0.9, [[0.001, 5], [inf, 10]]),
            empty: m.quantile(0.5, [[0.001, 0], [inf, 0]]),
            requests: scrape.sum('convserve_requests_total'),
            ok: scrape.sum('convserve_requests_total', (l) => l.status === '200'),
            passes: scrape.sum('convserve_batch_size_count'),
          };
        }""",
        text,
    )
    assert results["half"] == pytest.approx(0.002)
    assert results["threeQuarters"] == pytest.approx(0.0035)
    assert results["beyond"] == pytest.approx(0.001)  # as Prometheus: the highest finite bound
    assert results["empty"] is None
    assert results["requests"] == metric_value(text, "convserve_requests_total")
    assert results["ok"] == metric_value(text, "convserve_requests_total", status="200")
    assert results["passes"] == metric_value(text, "convserve_batch_size_count")
