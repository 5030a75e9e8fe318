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


def _scroll_text(page, selector: str) -> str:
    return page.locator(selector).inner_text().replace("\n", "")


def test_page_alternatives_pin_and_clear(page, base_url, tiny_predictor, tmp_path):
    """Click a character of the answer, pick an alternative: it is pinned there and the line is answered again,
    still a couplet; clearing the pins brings back the first answer (issue 18)."""
    page.goto(base_url + "/")
    page.fill("#upper", UPPER)
    page.select_option("#top_k", "1")
    page.click("#match")
    page.wait_for_selector("#candidates li.candidate")
    first = _scroll_text(page, "#scroll-lower")
    assert first == tiny_predictor.match(UPPER).best
    assert page.locator("#clear-pins").is_disabled()

    page.locator("#scroll-lower .ch.pick").nth(2).click()
    page.wait_for_selector("#alternatives button.alt")
    offered = [b.get_attribute("data-char") for b in page.locator("#alternatives button.alt").all()]
    expected = [a.char for a in tiny_predictor.match(UPPER, alternatives=8).alternatives[2]]
    assert offered == expected and first[2] not in offered
    assert "第 3 字" in page.locator("#alternatives-title").inner_text()

    pick = offered[0]
    page.locator("#alternatives button.alt").first.click()
    page.wait_for_function(
        "c => Array.from(document.querySelectorAll('#scroll-lower .ch')).map(e => e.textContent)[2] === c", arg=pick
    )
    second = _scroll_text(page, "#scroll-lower")
    assert len(second) == len(UPPER) and second[2] == pick
    assert all(a != b for a, b in zip(UPPER, second))  # still a couplet: nothing copied in place
    assert second == tiny_predictor.match(UPPER, pins={2: pick}).best
    assert _scroll_text(page, "#scroll-upper") == UPPER
    assert page.locator("#scroll-lower .ch.pinned").count() >= 1
    assert page.locator("#scroll-lower .ch").nth(2).get_attribute("class").split().count("pinned") == 1
    assert pick in page.locator("#pins").inner_text()
    assert page.locator("#clear-pins").is_enabled()
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "pinned.png"), full_page=True)

    page.click("#clear-pins")
    page.wait_for_function("document.getElementById('pins').textContent === '—'")
    page.wait_for_function("t => Array.from(document.querySelectorAll('#scroll-lower .ch')).map(e => e.textContent).join('') === t", arg=first)
    assert page.locator("#clear-pins").is_disabled()
    assert page.locator("#scroll-lower .ch.pinned").count() == 0


def test_page_reverse_direction_and_head(page, base_url, tiny_predictor):
    """下联→上联 with a 藏头 character: the given line hangs on the left (下联), the answer on the right, starting with it."""
    page.goto(base_url + "/")
    page.click("label[for=dir-up]")
    assert page.locator("#match").inner_text() == "对上联"
    assert "上联" in page.locator("#candidates-title").inner_text()
    page.fill("#upper", UPPER)
    page.fill("#head", "云")
    page.select_option("#top_k", "2")
    page.click("#match")
    page.wait_for_selector("#candidates li.candidate")
    lowers = page.locator("#candidates li.candidate .lower").all_inner_texts()
    assert lowers == [c.lower for c in tiny_predictor.match(UPPER, top_k=2, direction="up", pins={0: "云"}).candidates]
    assert all(line[0] == "云" and len(line) == len(UPPER) for line in lowers)
    assert _scroll_text(page, "#scroll-lower") == UPPER  # the given line is the 下联
    assert _scroll_text(page, "#scroll-upper") == lowers[0]
    assert page.locator("#scroll-upper .ch.pick").count() == len(UPPER)
    assert page.locator("#scroll-lower .ch.pick").count() == 0

    # alternatives of a candidate other than the best are asked for that line
    if len(lowers) > 1:
        page.locator("#candidates li.candidate").nth(1).click()
        page.locator("#scroll-upper .ch.pick").nth(1).click()
        page.wait_for_selector("#alternatives button.alt, #alternatives li.empty")
        assert lowers[1][1] not in [b.get_attribute("data-char") for b in page.locator("#alternatives button.alt").all()]

    # back to 上联→下联: the head still applies, the page labels follow
    page.click("label[for=dir-down]")
    page.click("#match")
    page.wait_for_function("t => document.getElementById('scroll-upper').textContent === t", arg=UPPER)
    assert _scroll_text(page, "#scroll-lower")[0] == "云"
    assert page.locator("#match").inner_text() == "对下联"
