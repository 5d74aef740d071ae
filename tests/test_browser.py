"""The search and judging pages in a real headless Chromium (Debian's chromium + chromedriver,
installed by .ci/run; skipped elsewhere unless DERMRIS_REQUIRE_BROWSER=1 makes a missing browser
a failure). DERMRIS_SCREENSHOT_DIR=folder saves a screenshot of each page there."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from dermris.app import judge  # noqa: E402
from dermris.app.server import create_app  # noqa: E402
from dermris.retriever import MEASURES, Retriever  # noqa: E402

from live_server import live_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("DERMRIS_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "chromium and chromedriver are required (apt-get install chromium chromium-driver)"
            )
        pytest.skip("needs chromium and chromedriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("DERMRIS_SCREENSHOT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / name))


def _card_classes(driver) -> list[str]:
    """The judging cards' classes, read in one script (the grid re-renders after every click)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid .card')].map(c => c.className)"
    )


def _wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def test_search_page_upload_results_viewer_and_judging(
    browser, indexed_store, synthetic_set, tmp_path
):
    images, _ = synthetic_set
    query = images / "SYN_reticular_003.jpg"
    out = tmp_path / "session"
    judge.prepare_session(Retriever.open(indexed_store, device="cpu"), out, queries=2, seed=3, k=3)
    with live_server(
        lambda port: create_app(indexed_store, port=port, device="cpu", judge_session=out)
    ) as base:
        # -- search: upload a query image, nine result groups, the same image on top of each
        browser.get(base + "/")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#measures input")) == 9)
        browser.execute_script("document.getElementById('file').hidden = false")
        browser.find_element(By.ID, "file").send_keys(str(query))
        _wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "query-preview").get_attribute("src").startswith("blob:")
            ),
        )
        browser.find_element(By.ID, "go").click()
        groups = _wait(
            browser,
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, ".measure")) == 9
                and d.find_elements(By.CSS_SELECTOR, ".measure")
            ),
        )
        assert [g.find_element(By.TAG_NAME, "h2").text for g in groups] == list(MEASURES)
        for group in groups:
            first = group.find_element(By.CSS_SELECTOR, ".hit img:not(.outline)")
            assert first.get_attribute("alt") == "SYN_reticular_003", group.text
        assert browser.find_element(By.ID, "error").text == ""
        _wait(
            browser,
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('.hit img')]"
                ".every(i => i.complete && i.naturalWidth > 0)"
            ),
        )
        _screenshot(browser, "search-page.png")

        # -- open a result: the query and the result side by side, both lesion outlines drawn
        groups[2].find_elements(By.CSS_SELECTOR, ".hit")[1].click()
        _wait(browser, lambda d: d.find_element(By.ID, "viewer").is_displayed())
        for element in ("v-query", "v-hit", "v-query-outline", "v-hit-outline"):
            _wait(
                browser,
                lambda d, e=element: d.execute_script(
                    f"const i = document.getElementById('{e}'); "
                    "return i.complete && i.naturalWidth > 0"
                ),
            )
        assert (
            browser.find_element(By.ID, "v-query-outline")
            .get_attribute("src")
            .startswith("data:image/png")
        )
        drawn = browser.execute_script("""
            const img = document.getElementById('v-hit-outline');
            const c = document.createElement('canvas');
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            const a = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
            for (let i = 3; i < a.length; i += 4) n += a[i] > 0; return n;""")
        assert drawn > 0  # the outline has pixels
        stages = browser.find_elements(By.CSS_SELECTOR, "#stages tr")
        assert len(stages) == 1 + 7  # header and the seven stages of the style loss
        _screenshot(browser, "search-viewer.png")
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape
        _wait(browser, lambda d: not d.find_element(By.ID, "viewer").is_displayed())

        # -- judging: rater id, keyboard shortcuts, a click, full-resolution zoom, next query
        browser.execute_script("localStorage.clear()")
        browser.get(base + "/judge/")
        _wait(browser, lambda d: d.find_element(By.ID, "rater-input").is_displayed())
        browser.find_element(By.ID, "rater-input").send_keys("dr_a")
        browser.find_element(By.ID, "rater-go").click()
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) > 0)
        tasks = json.loads((out / "tasks.json").read_text())
        items = tasks["queries"][0]["items"]
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("s")  # first image: similar (focus moves on)
        _wait(browser, lambda d: "yes" in _card_classes(d)[0].split())
        body.send_keys("d")  # second: not similar
        _wait(browser, lambda d: "no" in _card_classes(d)[1].split())
        browser.find_elements(By.CSS_SELECTOR, "#grid .card")[2].find_element(
            By.CSS_SELECTOR, "button.yes"
        ).click()
        _wait(browser, lambda d: "yes" in _card_classes(d)[2].split())
        body.send_keys("z")
        _wait(
            browser,
            lambda d: (
                d.find_element(By.ID, "zoom").is_displayed()
                and d.execute_script(
                    "const i = document.getElementById('zi'); "
                    "return i.complete && i.naturalWidth > 0"
                )
            ),
        )
        assert "full=true" in browser.find_element(By.ID, "zi").get_attribute("src")
        _screenshot(browser, "judge-zoom.png")
        body.send_keys("\ue00c")
        _wait(browser, lambda d: not d.find_element(By.ID, "zoom").is_displayed())
        _screenshot(browser, "judge-page.png")
        body.send_keys("]")
        _wait(browser, lambda d: d.find_element(By.ID, "title").text.startswith("query 2"))

    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [(r["rater"], r["item"], r["similar"]) for r in records] == [
        ("dr_a", items[0], True),
        ("dr_a", items[1], False),
        ("dr_a", items[2], True),
    ]
    assert all(r["query"] == "Q001" and r["time"] for r in records)
