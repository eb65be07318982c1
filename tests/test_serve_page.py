"""The page at / (issue: a page where a person can draw a digit), in a real browser: Debian's chromium
driven headless by chromedriver through selenium, against `resnet-edge serve` with the real model of the
session's `trained_run`. A digit of the MNIST test set is drawn on the canvas with pointer events (the
page's own drawing code), Predict is clicked, and the digit shown must be what /v1/predict answers for
that test image; a chosen and a dropped file, the keyboard, the server's errors, the Content-Security-Policy
(nothing loaded from outside, no console error) are checked the same way. Without chromium, chromedriver
or selenium the browser tests are skipped, saying what to install; the header tests run everywhere."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal

import httpx
import numpy as np
import pytest
from helpers import start_server
from PIL import Image
from test_serve_hardening import linear_model

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver; pip install -e '.[dev]' (selenium)"
SCREENSHOT_ENV = "RESNET_EDGE_PAGE_SCREENSHOT"  # a path: where the browser test also saves its screenshot
WAIT_S = 30


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _predict(url: str, png: bytes) -> dict:
    response = httpx.post(f"{url}/v1/predict", content=png, headers={"content-type": "image/png"}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return response.json()


def _stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


# ------------------------------------------------------------------------------------ the page's HTTP answer
@pytest.fixture(scope="module")
def linear_server(tmp_path_factory):
    proc, url = start_server("--model", linear_model(tmp_path_factory.mktemp("models") / "linear.onnx"))
    yield url
    _stop(proc)


def test_the_page_is_html_with_a_strict_policy_that_allows_its_own_inline_code(linear_server):
    response = httpx.get(f"{linear_server}/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.content
    assert html.startswith(b"<!doctype html>") and b"</html>" in html
    policy = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    inline = {
        kind: {"'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'" for text in blocks}
        for kind in ("script", "style")
        for blocks in [re.findall(rf"<{kind}>(.*?)</{kind}>".encode(), html, re.DOTALL)]
    }
    assert inline["script"] and inline["style"]
    assert set(policy["script-src"].split()) == inline["script"]
    assert set(policy["style-src"].split()) == inline["style"]
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert not re.search(r"https?:|//[a-z]", response.headers["content-security-policy"])
    # nothing in the page names another origin or a file to load: no src=, href=, url(), @import
    assert not re.search(rb"\b(src|href)\s*=|url\(|@import|https?://", html)


def test_head_and_favicon_and_the_other_routes_are_unchanged(linear_server):
    head = httpx.head(f"{linear_server}/")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{linear_server}/favicon.ico").status_code == 204  # no 404 for the browser to log
    assert httpx.post(f"{linear_server}/").status_code == 405
    assert httpx.get(f"{linear_server}/index.html").status_code == 404
    assert httpx.get(f"{linear_server}/v2/health/live").json() == {"live": True}


# ------------------------------------------------------------------------------------------- in chromium
# A mark, not a skip inside a fixture: pytest sets up session fixtures (trained_run trains a model) first.
browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None or importlib.util.find_spec("selenium") is None,
    reason=f"the browser tests need chromium, chromedriver and selenium ({INSTALL})",
)


@pytest.fixture(scope="module")
def webdriver():
    from selenium import webdriver

    return webdriver


@pytest.fixture(scope="module")
def served(webdriver, trained_run):
    run_dir, _, _ = trained_run
    proc, url = start_server("--model", run_dir / "model.onnx")
    yield url
    _stop(proc)


class Page:
    """One headless chromium on the page; ``console`` and ``urls`` gather its console messages and every
    URL it requested (from chromedriver's browser and performance logs)."""

    def __init__(self, webdriver, url: str) -> None:
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1100,900",
            "--no-first-run",
            "--disable-extensions",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.url, self.console, self.urls = url, [], []
        self.driver.get(url + "/")

    def logs(self) -> None:
        self.console += self.driver.get_log("browser")
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.urls.append(message["params"]["request"]["url"])

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def by_id(self, name: str):
        return self.driver.find_element("id", name)

    def result(self) -> dict:
        """After an action that predicts: wait for its answer; the digit shown, the bars' text, the error."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, WAIT_S).until(
            lambda _: self.by_id("answer").text not in ("", "waiting", "Predicting…")
        )
        return self.js("""
            const digit = document.getElementById("digit");
            return {digit: digit ? Number(digit.textContent) : null,
                    answer: document.getElementById("answer").textContent,
                    error: document.getElementById("error").textContent,
                    values: [...document.querySelectorAll("#bars .v")].map((v) => v.textContent),
                    widths: [...document.querySelectorAll("#bars .bar")].map((b) => b.getBoundingClientRect().width /
                                                                               b.parentElement.getBoundingClientRect().width)};
        """)

    def expect_an_answer(self) -> None:
        self.js("document.getElementById('answer').textContent = 'waiting';")

    def close(self) -> None:
        self.logs()
        self.driver.quit()

    def check_clean(self, allowed: tuple[str, ...] = ()) -> None:
        """No console error or warning (but ``allowed``), and no request but to the server."""
        self.logs()
        bad = [
            m
            for m in self.console
            if m["level"] in ("SEVERE", "WARNING") and not any(a in m["message"] for a in allowed)
        ]
        assert not bad, bad
        assert self.urls and all(u.startswith(self.url + "/") or u.startswith(("blob:", "data:")) for u in self.urls), (
            self.urls
        )
        resources = self.js("return performance.getEntriesByType('resource').map((r) => r.name);")
        assert all(r.startswith(self.url + "/") for r in resources), resources


@pytest.fixture
def page(webdriver, served):
    page = Page(webdriver, served)
    yield page
    page.close()


def _strokes(digit: np.ndarray, threshold: int = 128) -> list[tuple[int, int, int]]:
    """The digit's bright pixels as horizontal runs: (row, first column, last column)."""
    runs = []
    for row in range(digit.shape[0]):
        bright = np.concatenate([[False], digit[row] > threshold, [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(bright))
        runs += [(row, int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    return runs


def _draw(page: Page, digit: np.ndarray, kind: str = "mouse") -> None:
    """Draw the 28x28 digit on the canvas as the page's user would: a pointer pressed, moved along each run
    of bright pixels and lifted (real input events through chromedriver, so the page's pointer handlers)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = page.by_id("pad")
    size = page.js("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", canvas)
    cell = size[0] / digit.shape[1], size[1] / digit.shape[0]

    def offset(row: int, col: int) -> tuple[int, int]:  # from the canvas' centre, as WebDriver counts
        return round((col + 0.5) * cell[0] - size[0] / 2), round((row + 0.5) * cell[1] - size[1] / 2)

    actions = ActionBuilder(page.driver, mouse=PointerInput(kind, kind), duration=40)  # ms a move
    for row, first, last in _strokes(digit):
        actions.pointer_action.move_to(canvas, *offset(row, first)).pointer_down()
        if last > first:
            actions.pointer_action.move_to(canvas, *offset(row, last))
        actions.pointer_action.pointer_up()
    actions.perform()


def _canvas_png(page: Page) -> bytes:
    url = page.js("return document.getElementById('pad').toDataURL('image/png');")
    return base64.b64decode(url.split(",", 1)[1])


def _shows(result: dict, answer: dict) -> None:
    """The page shows the server's answer: the digit, and each probability as text and as a bar."""
    assert result["error"] == "" and result["digit"] == answer["digit"], (result, answer)
    for text, width, p in zip(result["values"], result["widths"], answer["probabilities"], strict=True):
        assert text.endswith("%") and abs(float(text[:-1]) - 100 * p) <= 0.05 + 1e-9, (text, p)
        assert abs(width - p) < 0.01, (width, p)


@browser
def test_a_drawn_test_digit_is_predicted_as_v1_predict_predicts_it(page, mnist, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    # a test image the model is sure of, so that drawing it with a round brush cannot tip the answer
    candidates = [
        (max(a["probabilities"]), i, a)
        for i in range(40)
        for a in [_predict(page.url, _png(mnist.test_images[i]))]
        if a["digit"] == mnist.test_labels[i]
    ]
    _, index, expected = max(candidates, key=lambda c: c[:2])
    digit = mnist.test_images[index]
    _draw(page, digit)
    page.expect_an_answer()
    page.by_id("predict").click()
    result = page.result()
    assert result["digit"] == expected["digit"] == mnist.test_labels[index], (index, result, expected)
    assert f"Predicted digit: {expected['digit']}" in result["answer"]
    _shows(result, _predict(page.url, _canvas_png(page)))  # the bars are the server's answer for the canvas
    assert page.by_id("answer").get_attribute("aria-live") == "polite"
    ActionChains(page.driver).move_to_element(page.driver.find_element("tag name", "h1")).perform()  # no hover
    page.driver.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(tmp_path / "page.png", os.environ[SCREENSHOT_ENV])
    page.check_clean()
    assert f"{page.url}/v1/predict" in page.urls


@browser
def test_a_chosen_file_and_a_dropped_file_are_predicted(page, mnist, tmp_path):
    ink_on_paper = 255 - np.kron(mnist.test_images[1], np.ones((3, 3), np.uint8))  # dark on light, 84x84
    chosen = tmp_path / "digit.png"
    chosen.write_bytes(_png(ink_on_paper))
    page.expect_an_answer()
    page.by_id("file").send_keys(str(chosen))
    _shows(page.result(), _predict(page.url, chosen.read_bytes()))

    dropped = _png(mnist.test_images[2])
    page.expect_an_answer()
    page.js(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true,
                                                                              cancelable: true}));
    """,
        base64.b64encode(dropped).decode(),
    )
    _shows(page.result(), _predict(page.url, dropped))
    page.check_clean()


@browser
def test_the_servers_error_is_shown_as_text(page, tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are notes, not a PNG")
    refused = httpx.post(f"{page.url}/v1/predict", files={"file": ("notes.png", not_an_image.read_bytes())})
    assert refused.status_code == 400
    page.expect_an_answer()
    page.by_id("file").send_keys(str(not_an_image))
    result = page.result()
    assert result["digit"] is None and refused.json()["error"] in result["error"], result
    assert page.by_id("error").get_attribute("role") == "alert"
    assert all(v == "–" for v in result["values"])
    page.check_clean(allowed=("/v1/predict - Failed to load resource: the server responded with a status of 400",))


def _contrast(foreground: str, background: str) -> float:
    def luminance(css: str) -> float:
        channels = [int(c) / 255 for c in re.findall(r"\d+", css)[:3]]
        r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@browser
def test_keyboard_labels_focus_and_contrast(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    order, outlines = [], []
    for _ in range(3):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()
        order.append(page.js("return document.activeElement.id;"))
        outlines.append(
            page.js(
                "const s = getComputedStyle(document.activeElement);"
                "return [s.outlineStyle, parseFloat(s.outlineWidth)];"
            )
        )
    assert order == ["clear", "predict", "file"]
    assert all(style != "none" and width >= 2 for style, width in outlines), outlines
    # Predict by keyboard with nothing drawn: told so, as text
    ActionChains(page.driver).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    page.expect_an_answer()
    ActionChains(page.driver).send_keys(Keys.ENTER).perform()
    assert "Draw a digit" in page.result()["error"]
    labels = page.js("""
        const file = document.getElementById("file");
        return [file.labels.length ? file.labels[0].textContent : "",
                document.getElementById("pad").getAttribute("aria-label"),
                document.getElementById("bars").getAttribute("aria-labelledby")];
    """)
    assert labels[0].strip() and labels[1] and labels[2]
    colours = page.js("""
        const solid = (el) => {  // the first background colour that is not transparent, from el up
            for (; el; el = el.parentElement) {
                const c = getComputedStyle(el).backgroundColor;
                if (!/rgba\\(.*, 0\\)$/.test(c) && c !== "transparent") return c;
            }
            return "rgb(255, 255, 255)";
        };
        return [...document.querySelectorAll("h1, h2, p, label, button, .v, .d, #error")]
            .filter((el) => el.textContent.trim() && el.getClientRects().length)
            .map((el) => [el.id || el.className || el.tagName, getComputedStyle(el).color, solid(el)]);
    """)
    assert len(colours) >= 10
    low = [(name, fg, bg) for name, fg, bg in colours if _contrast(fg, bg) < 4.5]
    assert not low, low
    page.check_clean()


@browser
def test_a_touch_stroke_draws_and_clear_clears(page, mnist):
    from selenium.webdriver.common.actions import interaction

    def ink() -> int:  # pixels drawn white on the black canvas
        return int((np.asarray(Image.open(io.BytesIO(_canvas_png(page))).convert("L")) > 127).sum())

    assert ink() == 0
    _draw(page, mnist.test_images[0], kind=interaction.POINTER_TOUCH)
    assert ink() > 2000
    page.by_id("clear").click()
    assert ink() == 0
    page.check_clean()
