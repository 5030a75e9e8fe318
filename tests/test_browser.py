"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
from modelkit import UPPER

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install -y chromium chromium-driver)"
)


@pytest.fixture(scope="module")
def base_url(tiny_predictor):
    from servers import serve_in_thread

    from couplet.serving import create_app

    with serve_in_thread(create_app(tiny_predictor)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1000, "height": 760}, locale="zh-CN")
    p = context.new_page()
    p.set_default_timeout(15_000)
    yield p
    context.close()


def test_page_answers_and_shows_a_vertical_couplet(page, base_url, tmp_path):
    page.goto(base_url + "/")
    assert "对联" in page.title()
    page.fill("#upper", UPPER)
    page.select_option("#top_k", "3")
    page.click("#match")
    page.wait_for_selector("#candidates li.candidate")

    lowers = page.locator("#candidates li.candidate .lower").all_inner_texts()
    scores = page.locator("#candidates li.candidate .score").all_inner_texts()
    assert 1 <= len(lowers) <= 3 and len(scores) == len(lowers)
    assert all(len(lower) == len(UPPER) for lower in lowers)
    assert all(float(s) <= 0 for s in scores)  # log-probabilities
    assert page.locator("#error").is_hidden()

    upper_scroll, lower_scroll = page.locator("#scroll-upper"), page.locator("#scroll-lower")
    assert upper_scroll.inner_text().replace("\n", "") == UPPER
    assert lower_scroll.inner_text().replace("\n", "") == lowers[0]
    for scroll in (upper_scroll, lower_scroll):
        assert scroll.evaluate("e => getComputedStyle(e).writingMode") == "vertical-rl"
        box = scroll.bounding_box()
        assert box["height"] > box["width"]  # a tall, narrow scroll
    # 上联 hangs on the right, 下联 on the left
    assert upper_scroll.bounding_box()["x"] > lower_scroll.bounding_box()["x"]
    assert page.locator("#meta").inner_text().strip() != ""

    # picking another candidate puts it on the left scroll
    if len(lowers) > 1:
        page.locator("#candidates li.candidate").nth(1).click()
        assert lower_scroll.inner_text().replace("\n", "") == lowers[1]

    shot = tmp_path / "couplet.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 5_000


def test_page_shows_errors_inline(page, base_url):
    page.goto(base_url + "/")
    page.fill("#upper", "hello")
    page.click("#match")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "chinese" in error.inner_text().lower()
    assert page.locator("#candidates li.candidate").count() == 0

    page.fill("#upper", "春风龘")
    page.click("#match")
    page.wait_for_function("document.getElementById('error').textContent.includes('龘')")

    # a good line afterwards clears the error
    page.fill("#upper", "海阔凭鱼跃")
    page.click("#match")
    page.wait_for_selector("#candidates li.candidate")
    assert error.is_hidden()
    assert page.locator("#scroll-upper").inner_text().replace("\n", "") == "海阔凭鱼跃"
