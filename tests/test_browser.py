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
        if not browser.find_element(By.ID, "outlines").is_selected():
            browser.find_element(By.ID, "outlines").click()  # off by default for untrained masks
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


# -- the search page's own behaviour (issue 21) ------------------------------------------------

_PAGE_HOOKS = """
window.__searches = 0;
const __fetch = window.fetch;
window.fetch = async (...args) => {
  const url = String(args[0]);
  if (url.startsWith('/api/search')) window.__searches += 1;
  const answer = await __fetch(...args);
  const forced = %s;
  if (url.startsWith('/api/info') && forced !== null) {
    const info = await answer.clone().json();
    info.segmenter_trained = forced;
    return new Response(JSON.stringify(info),
                        {status: 200, headers: {'content-type': 'application/json'}});
  }
  return answer;
};
"""


def _open_page(driver, url: str, *, segmenter_trained: bool | None = None) -> None:
    """Load the search page with a fetch counter (``window.__searches``) and, when given, the
    ``segmenter_trained`` that ``/api/info`` reports forced to that value."""
    forced = "null" if segmenter_trained is None else str(segmenter_trained).lower()
    hook = driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": _PAGE_HOOKS % forced}
    )
    try:
        driver.get(url)
        _wait(driver, lambda d: d.find_element(By.ID, "store-info").text != "")
    finally:
        driver.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": hook["identifier"]}
        )


def _row_search(driver, row: int, *, measures: int | None = None) -> None:
    box = driver.find_element(By.ID, "row")
    box.clear()
    box.send_keys(str(row))
    driver.find_element(By.ID, "go").click()
    _wait(
        driver,
        lambda d: d.execute_script(
            "return (last !== null && !!last.results) || !document.getElementById('error').hidden"
        ),
    )
    assert driver.find_element(By.ID, "error").text == ""
    assert driver.execute_script("return last.query.row") == row
    if measures is not None:
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".measure")) == measures)


def _loaded(driver, element_id: str) -> bool:
    return driver.execute_script(
        f"const i = document.getElementById('{element_id}'); "
        "return i.complete && i.naturalWidth > 0"
    )


@pytest.fixture(scope="module")
def page_url(indexed_store):
    with live_server(lambda port: create_app(indexed_store, port=port, device="cpu")) as base:
        yield base + "/"


def test_row_query_shows_the_query_image_and_outlines_toggle_without_a_search(browser, page_url):
    _open_page(browser, page_url, segmenter_trained=True)  # outlines on by default
    _row_search(browser, 5, measures=9)
    preview = browser.find_element(By.ID, "query-preview")
    assert preview.is_displayed() and "/api/image/5" in preview.get_attribute("src")
    _wait(browser, lambda d: _loaded(d, "query-preview"))
    caption = browser.find_element(By.ID, "query-caption").text
    assert caption.startswith("query: SYN_") and "(row 5)" in caption
    assert preview.get_attribute("alt") == caption.split()[1]
    assert browser.execute_script("return window.__searches") == 1

    def outlines_shown(d) -> list[bool]:
        return d.execute_script(
            "return [...document.querySelectorAll('#results img.outline')]"
            ".map(i => getComputedStyle(i).display !== 'none')"
        )

    browser.execute_script("document.querySelector('.measure').dataset.kept = 'yes'")
    assert browser.find_element(By.ID, "outlines").is_selected()  # a trained segmenter: on
    assert all(outlines_shown(browser)) and len(outlines_shown(browser)) == 9 * 5
    browser.find_element(By.ID, "outlines").click()
    assert not any(outlines_shown(browser))
    browser.find_element(By.ID, "outlines").click()
    assert all(outlines_shown(browser))
    _wait(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img.outline')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
    )
    # the same results on screen: no new search, nothing re-rendered
    assert browser.execute_script("return window.__searches") == 1
    assert browser.execute_script("return document.querySelector('.measure').dataset.kept") == "yes"


def test_errors_show_in_place_and_clear_stale_results(browser, page_url):
    _open_page(browser, page_url)
    _row_search(browser, 2, measures=9)
    assert browser.find_element(By.ID, "export").is_displayed()
    where = browser.find_element(By.ID, "where")
    where.send_keys("no_such_column == 1")
    browser.find_element(By.ID, "go").click()
    error = _wait(
        browser,
        lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error"),
    )
    message = error.text
    assert "no_such_column" in message and not message.startswith(('"', "[", "{")), message
    assert browser.find_elements(By.CSS_SELECTOR, ".measure") == []  # the old results are gone
    assert not browser.find_element(By.ID, "export").is_displayed()
    # in view: the error is where the results were, not below the fold
    top = browser.execute_script(
        "return document.getElementById('error').getBoundingClientRect().top"
    )
    assert 0 <= top < browser.execute_script("return window.innerHeight")
    # a validation error (k over its limit) is one readable line too, not JSON
    where.clear()
    k = browser.find_element(By.ID, "k")
    browser.execute_script("arguments[0].value = '5000'", k)
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: "1000" in d.find_element(By.ID, "error").text)
    message = browser.find_element(By.ID, "error").text
    assert message.startswith("k:") and "{" not in message, message
    # and a good search clears the error
    browser.execute_script("arguments[0].value = '5'", k)
    browser.find_element(By.ID, "go").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".measure")) == 9)
    assert not browser.find_element(By.ID, "error").is_displayed()
    # the where hint names this store's own columns, never an ISIC column it lacks
    hint = browser.find_element(By.ID, "where-hint").text
    assert "texture" in hint and "diagnosis_1" not in hint


@pytest.mark.parametrize("trained", [False, True])
def test_untrained_segmenter_banner_and_outlines_off(browser, page_url, trained):
    _open_page(browser, page_url, segmenter_trained=trained)
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed() is (not trained)
    if not trained:
        assert "untrained" in banner.text.lower() and "i1_sd" in banner.text
    assert browser.find_element(By.ID, "outlines").is_selected() is trained
    _row_search(browser, 1, measures=9)
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#results img.outline')]"
        ".filter(i => getComputedStyle(i).display !== 'none' && i.getAttribute('src')).length"
    )
    assert shown == (45 if trained else 0)  # untrained: not drawn, and the masks not even fetched


HOSTILE = '<img src=x onerror="window.__pwned = 1">'


@pytest.fixture(scope="module")
def isic_page_url(tmp_path_factory):
    """A store (random rows, no model) with the isic-cli export's columns and a hostile value."""
    from conftest import make_random_store

    n = 12
    store = make_random_store(
        tmp_path_factory.mktemp("isic") / "store",
        n=n,
        seed=21,
        extra_columns={
            "isic_id": [f"ISIC_{1000000 + i:07d}" for i in range(n - 1)] + ["not-an-isic-id"],
            "diagnosis_1": ["Malignant" if i % 3 == 0 else "Benign" for i in range(n)],
            "diagnosis_2": [HOSTILE if i % 2 else "=1+1" for i in range(n)],
            "diagnosis_3": ["Melanoma, NOS" if i % 3 == 0 else "Nevus" for i in range(n)],
            "age_approx": [30 + 5 * i for i in range(n)],
            "sex": ["female" if i % 2 else "male" for i in range(n)],
            "anatom_site_general": ["posterior torso"] * n,
            "attribution": ["Anonymous"] * n,
        },
    )
    with live_server(lambda port: create_app(store, port=port, device="cpu")) as base:
        yield base + "/", store


def _capture_downloads(driver) -> None:
    driver.execute_script(
        "window.__downloads = [];"
        "HTMLAnchorElement.prototype.click = function () {"
        "  if (this.download) window.__downloads.push({href: this.href, name: this.download});"
        "};"
    )


def _downloaded_text(driver, index: int) -> tuple[str, str]:
    return tuple(
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"const d = window.__downloads[{index}];"
            "fetch(d.href).then(r => r.text()).then(t => done([d.name, t]));"
        )
    )


def test_isic_columns_archive_links_export_and_escaping(browser, isic_page_url):
    import csv
    import io

    url, store = isic_page_url
    _open_page(browser, url)
    selected = browser.execute_script(
        "return [...document.getElementById('columns').selectedOptions].map(o => o.value)"
    )
    assert selected == [
        "isic_id",
        "diagnosis_1",
        "diagnosis_2",
        "diagnosis_3",
        "age_approx",
        "sex",
        "anatom_site_general",
    ]  # shown by default; `attribution` is offered, not chosen
    options = browser.execute_script(
        "return [...document.getElementById('columns').options].map(o => o.value)"
    )
    assert "attribution" in options and "path" not in options
    hint = browser.find_element(By.ID, "where-hint").text
    assert "diagnosis_1 == '…'" in hint and "age_approx" in hint and "texture" not in hint

    _row_search(browser, 0, measures=9)
    card = browser.find_elements(By.CSS_SELECTOR, ".measure")[0].find_element(
        By.CSS_SELECTOR, ".hit"
    )
    for column in ("diagnosis_1", "age_approx", "sex", "anatom_site_general"):
        assert f"{column}:" in card.text
    # store strings are text, never markup
    assert browser.execute_script("return window.__pwned") is None
    assert browser.find_elements(By.CSS_SELECTOR, ".hit b img") == []
    assert HOSTILE in browser.find_element(By.ID, "results").text

    expected = Retriever.open(store, device="cpu").search(
        0, measures="all", k=5, columns=tuple(selected)
    )
    links = browser.execute_script(
        "return [...document.querySelectorAll('.measure')[0].querySelectorAll('.hit')]"
        ".map(h => (h.querySelector('a.isic') || {}).href || null)"
    )
    first = expected["euclidean"]
    assert links == [
        f"https://api.isic-archive.com/images/{h.metadata['isic_id']}/"
        if h.metadata["isic_id"].startswith("ISIC_")
        else None
        for h in first
    ]
    anchor = browser.find_element(By.CSS_SELECTOR, "a.isic")
    assert anchor.get_attribute("target") == "_blank" and "noopener" in anchor.get_attribute("rel")

    _capture_downloads(browser)
    browser.find_element(By.ID, "export-csv").click()
    browser.find_element(By.ID, "export-json").click()
    name, text = _downloaded_text(browser, 0)
    assert name == "dermris-row-0.csv"
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0])[:9] == [
        "measure",
        "rank",
        "row",
        "image_id",
        "score",
        "es",
        "cs",
        "ss",
        "dc",
    ]
    assert len(rows) == 9 * 5
    for measure in MEASURES:
        mine = [r for r in rows if r["measure"] == measure]
        assert [int(r["row"]) for r in mine] == [h.row for h in expected[measure]]
        assert [float(r["score"]) for r in mine] == pytest.approx(
            [h.score for h in expected[measure]], rel=1e-12
        )
        assert [r["diagnosis_1"] for r in mine] == [
            h.metadata["diagnosis_1"] for h in expected[measure]
        ]
        assert [r["diagnosis_2"] for r in mine] == [
            "'=1+1" if h.metadata["diagnosis_2"] == "=1+1" else h.metadata["diagnosis_2"]
            for h in expected[measure]
        ]  # a value a spreadsheet would run as a formula is quoted
    name, text = _downloaded_text(browser, 1)
    assert name == "dermris-row-0.json"
    payload = json.loads(text)
    assert payload["query"]["row"] == 0 and "mask_outline_png" not in payload["query"]
    for measure in MEASURES:
        assert [h["row"] for h in payload["results"][measure]] == [h.row for h in expected[measure]]


def test_api_docs_render_from_this_server_only(browser, indexed_store):
    # a token on loopback: the page must pass it on to Swagger UI's files and the schema
    with live_server(
        lambda port: create_app(indexed_store, port=port, device="cpu", token="t&x")
    ) as base:
        browser.get(base + "/api/docs?token=t%26x")
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5)
        title = browser.find_element(By.CSS_SELECTOR, ".info .title").text
        assert title.startswith("dermris")
        assert "/api/search" in browser.find_element(By.ID, "swagger-ui").text
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert loaded and all(url.startswith(base + "/") for url in loaded)
        assert any("swagger-ui-bundle.js" in url for url in loaded)
        _screenshot(browser, "api_docs.png")
