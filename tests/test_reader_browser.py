"""The reader-study page (app/reader_page.html) in a real headless Chromium, as a rater uses it.

The browser, its skip logic (DERMRIS_REQUIRE_BROWSER=1 makes a missing browser a failure) and
the screenshots (DERMRIS_SCREENSHOT_DIR) are those of test_browser.py. The study is a tiny random
store (as in test_reader_study.py) whose rows are given real images, each of one colour that
names its row, so the page's images can be checked pixel by pixel.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium.webdriver")
import test_browser  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402
from test_browser import _screenshot, _wait  # noqa: E402

from dermris.app import reader_study as rs  # noqa: E402
from dermris.app.cli import main  # noqa: E402
from dermris.retriever import Retriever  # noqa: E402

from live_server import live_server  # noqa: E402

browser = test_browser.browser  # the same headless Chromium fixture (and skip logic)

RATER_X, RATER_Y = "dr_x", "dr.y@clinic"
CHOICES = ["bcc", "melanoma", "nevus"]


def _colour(row: int) -> tuple[int, int, int]:
    """The one colour of row ``row``'s image (distinct for rows 0-19)."""
    return (20 + 11 * row, 230 - 9 * row, (row * 67) % 256)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A prepared reader study (4 cases, 2 retrieved images each) whose images exist."""
    from conftest import make_random_store
    from PIL import Image

    n = 16
    root = tmp_path_factory.mktemp("reader-browser")
    store = make_random_store(
        root / "store",
        n=n,
        seed=73,
        clusters=3,
        extra_columns={
            "diagnosis": (CHOICES * 6)[:n],
            "lesion_id": [f"IL_{i // 2}" for i in range(n)],
        },
    )
    retriever = Retriever.open(store, device="cpu")
    out = rs.prepare_reader_study(retriever, root / "study", label_column="diagnosis", cases=4, k=2)
    # the random store's paths do not exist: point every image token at a real file
    key_file = out / rs.READER_KEY_FILE
    key = json.loads(key_file.read_text())
    row_of = {path: row for row, path in enumerate(retriever.paths)}
    (root / "images").mkdir()
    for token, path in key["images"].items():
        row = row_of[path]
        picture = root / "images" / f"row{row}.png"
        Image.new("RGB", (60, 48), _colour(row)).save(picture)
        key["images"][token] = str(picture)
    key_file.write_text(json.dumps(key, indent=1))
    return out, key, [str(v) for v in retriever.metadata().column("diagnosis").to_pylist()]


@pytest.fixture
def served(study, tmp_path):
    """A fresh copy of the study (no readings) served on a free port: (page URL, folder)."""
    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    with live_server(lambda port: rs.create_reader_app(out, port=port)) as base:
        yield base + "/reader/", out


def _readings(out) -> list[dict]:
    return [json.loads(line) for line in (out / rs.READINGS_FILE).read_text().splitlines()]


def _state(driver) -> dict:
    """What the page shows now, read in one script."""
    return driver.execute_script(
        """
        const $ = (id) => document.getElementById(id);
        const colour = (img) => {
          if (!img.complete || img.naturalWidth === 0) return null;
          const c = document.createElement('canvas');
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          const g = c.getContext('2d'); g.drawImage(img, 0, 0);
          const d = g.getImageData(c.width >> 1, c.height >> 1, 1, 1).data;
          return [d[0], d[1], d[2]];
        };
        const visible = (e) => !!e && !e.hidden && getComputedStyle(e).display !== 'none';
        return {
          shown: visible($('case')),
          done: visible($('done')),
          progress: $('progress').textContent,
          arm: $('arm').textContent,
          error: visible($('error')) ? $('error').textContent : '',
          query: colour($('query')),
          query_src: $('query').getAttribute('src') || '',
          images: document.querySelectorAll('#case img').length,
          retrieved: [...document.querySelectorAll('#retrieved img')].map(colour),
          captions: [...document.querySelectorAll('#retrieved figcaption')].map(
            (f) => f.textContent),
          case_text: [...$('case').childNodes].filter((n) => n.tagName !== 'FIELDSET')
            .map((n) => n.textContent).join(' '),
        };"""
    )


def _wait_step(driver, read: int, total: int) -> dict:
    """Wait until step ``read`` + 1 of ``total`` is on screen with all its images decoded."""

    def ready(d):
        s = _state(d)
        loaded = s["query"] is not None and all(c is not None for c in s["retrieved"])
        return s if s["shown"] and s["progress"] == f"{read} / {total} read" and loaded else None

    return _wait(driver, ready, timeout=30)


def _start(driver, url: str, rater: str, *, enter: bool = False) -> None:
    driver.get(url)
    box = driver.find_element(By.ID, "rater")
    box.send_keys(rater + ("\n" if enter else ""))
    if not enter:
        driver.find_element(By.ID, "start").click()


def _close(colour, expected, tolerance: int = 8) -> bool:
    return colour is not None and all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


def _by_mouse(driver, diagnosis: str, confidence: int) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#choices input[value='{diagnosis}']").click()
    Select(driver.find_element(By.ID, "confidence")).select_by_value(str(confidence))
    driver.find_element(By.ID, "save").click()


def _by_keyboard(driver, diagnosis: str, confidence: int) -> None:
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("abc"[CHOICES.index(diagnosis)])
    body.send_keys(str(confidence))
    body.send_keys("\n")


def test_a_rater_reads_the_whole_crossover_through_the_page_and_is_scored(browser, served, study):
    url, out = served
    _, key, labels = study
    plan = rs.schedule(out, RATER_X)
    total = len(plan)
    assert total == 8
    truth = {c: key["cases"][c]["diagnosis"] for c in key["cases"]}
    wrong = {c: next(d for d in CHOICES if d != t) for c, t in truth.items()}
    _start(browser, url, RATER_X, enter=True)  # Enter in the rater box starts
    slow_step, slow_seconds, slow_wall = 5, 0.6, 0.0
    for i, step in enumerate(plan):
        if i == 3:  # the rater stops and comes back later: the page resumes at step 4
            schedule = json.loads(
                urllib.request.urlopen(url + "api/schedule?rater=" + RATER_X, timeout=10).read()
            )
            assert len(schedule["done"]) == 3
            _start(browser, url, RATER_X)
        s = _wait_step(browser, i, total)
        secret = key["cases"][step["case"]]
        # the case's own image, whichever the arm
        assert _close(s["query"], _colour(secret["row"])), (s["query"], secret["row"])
        assert s["images"] == 1 + len(s["retrieved"]) and s["error"] == ""
        if step["arm"] == "without":
            assert "without retrieval" in s["arm"]
            assert s["retrieved"] == [] and s["captions"] == []
            assert not any(label in s["case_text"] for label in CHOICES), s["case_text"]
            _screenshot(browser, "reader-without.png")
        else:
            assert "with retrieval" in s["arm"] and "2 similar images" in s["arm"]
            assert len(s["retrieved"]) == 2
            for colour, row in zip(s["retrieved"], secret["retrieved_rows"]):
                assert _close(colour, _colour(row)), (colour, row)
            assert s["captions"] == [labels[row] for row in secret["retrieved_rows"]]
            _screenshot(browser, "reader-with.png")
        assert "/image/" in s["query_src"] and "row" not in s["query_src"]
        # right with retrieval, wrong without; confidence 4 with, 2 without
        diagnosis = truth[step["case"]] if step["arm"] == "with" else wrong[step["case"]]
        confidence = 4 if step["arm"] == "with" else 2
        if i == slow_step:
            began = time.monotonic()
            time.sleep(slow_seconds)
        (_by_keyboard if i % 2 else _by_mouse)(browser, diagnosis, confidence)
        _wait(browser, lambda d, n=i + 1: len(_readings(out)) == n, timeout=30)
        if i == slow_step:
            slow_wall = time.monotonic() - began
        last = _readings(out)[-1]
        assert (last["rater"], last["case"], last["arm"]) == (RATER_X, step["case"], step["arm"])
        assert (last["diagnosis"], last["confidence"]) == (diagnosis, confidence)
        assert 0 < last["seconds"] < 60
    _wait(browser, lambda d: _state(d)["done"])
    assert _state(browser)["progress"] == f"{total} / {total} read"
    assert not _state(browser)["shown"]
    _start(browser, url, RATER_X)  # coming back after the last case: nothing left to read
    _wait(browser, lambda d: _state(d)["done"])
    assert _state(browser)["progress"] == f"{total} / {total} read"

    # the readings follow this rater's crossover: every case once per period, arms swapped
    records = _readings(out)
    assert [(r["case"], r["arm"]) for r in records] == [(p["case"], p["arm"]) for p in plan]
    first = {r["case"]: r["arm"] for r in records[:4]}
    second = {r["case"]: r["arm"] for r in records[4:]}
    assert set(first) == set(second) == set(truth)
    assert all(first[c] != second[c] for c in first)
    # the time spent is the time the case was on screen
    assert slow_seconds <= records[slow_step]["seconds"] <= slow_wall + 0.5

    # a second rater gets their own order, and the page follows it
    other = rs.schedule(out, RATER_Y)
    assert [(p["case"], p["arm"]) for p in other] != [(p["case"], p["arm"]) for p in plan]
    _start(browser, url, RATER_Y)
    s = _wait_step(browser, 0, total)
    assert _close(s["query"], _colour(key["cases"][other[0]["case"]]["row"]))
    _by_mouse(browser, CHOICES[0], 5)
    _wait(browser, lambda d: len(_readings(out)) == total + 1, timeout=30)
    assert (_readings(out)[-1]["case"], _readings(out)[-1]["arm"]) == (
        other[0]["case"],
        other[0]["arm"],
    )

    # the score of what was read through the page
    score = rs.score_reader_study(out)
    assert list(score.per_rater) == [RATER_X]  # RATER_Y has no case in both arms yet
    x = score.per_rater[RATER_X]
    assert (x.paired, x.accuracy_with, x.accuracy_without) == (4, 1.0, 0.0)
    assert (x.only_with, x.only_without) == (4, 0)
    assert x.p_value == pytest.approx(rs.mcnemar_exact(4, 0)) == pytest.approx(0.125)
    assert (x.confidence_with, x.confidence_without) == (4.0, 2.0)
    assert x.seconds_with > 0 and x.seconds_without > 0
    result = CliRunner().invoke(main, ["judge", "--score", str(out)])
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith(RATER_X))
    assert line.split()[1:6] == ["4", "100.0%", "0.0%", "4", "0"] and "0.1250" in line


def _message(driver, contains: str) -> str:
    text = _wait(
        driver,
        lambda d: contains in _state(d)["error"] and _state(d)["error"],
        timeout=30,
    )
    assert not text.lstrip().startswith(("{", "[", '"')), text  # a sentence, not JSON
    top = driver.execute_script(
        "return document.getElementById('error').getBoundingClientRect().top"
    )
    assert 0 <= top < driver.execute_script("return window.innerHeight")  # in view
    return text


def test_bad_input_shows_a_message_and_records_nothing(browser, served):
    url, out = served
    plan = rs.schedule(out, RATER_X)
    browser.get(url)
    browser.find_element(By.ID, "start").click()  # no rater id
    _message(browser, "rater id")
    assert not _state(browser)["shown"]
    _start(browser, url, "a b")
    _message(browser, "rater id")
    _start(browser, url, RATER_X)
    s = _wait_step(browser, 0, len(plan))
    assert s["error"] == ""

    save = browser.find_element(By.ID, "save")
    save.click()  # nothing chosen
    _message(browser, "choose a diagnosis")
    browser.find_element(By.CSS_SELECTOR, f"#choices input[value='{CHOICES[1]}']").click()
    save.click()  # no confidence chosen: no default is recorded for the rater
    _message(browser, "choose a confidence")
    # a confidence out of range (a stale or tampered page): the server's reason, on the page
    browser.execute_script(
        "const o = document.createElement('option'); o.value = '9'; o.textContent = '9';"
        "document.getElementById('confidence').append(o);"
    )
    Select(browser.find_element(By.ID, "confidence")).select_by_value("9")
    save.click()
    _message(browser, "confidence must be an integer from 1 to 5")
    # a diagnosis that is not one of the study's choices
    browser.execute_script("document.querySelector('#choices input:checked').value = 'other'")
    Select(browser.find_element(By.ID, "confidence")).select_by_value("3")
    save.click()
    _message(browser, "diagnosis must be one of bcc, melanoma, nevus")
    assert _readings(out) == []  # nothing recorded
    assert _state(browser)["progress"] == f"0 / {len(plan)} read"  # still the first case

    # corrected: saved, the message goes; saving twice at once saves once and skips no case
    browser.execute_script(
        "document.querySelector('#choices input:checked').value = arguments[0]", CHOICES[1]
    )
    browser.execute_script(  # a click, Enter and another click before the first save returns
        "const b = document.getElementById('save'); b.click();"
        "document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'})); b.click();"
    )
    s = _wait_step(browser, 1, len(plan))
    time.sleep(0.3)  # a second reading, if any, would be written by now
    assert s["error"] == ""
    records = _readings(out)
    assert [(r["case"], r["arm"], r["diagnosis"], r["confidence"]) for r in records] == [
        (plan[0]["case"], plan[0]["arm"], CHOICES[1], 3)
    ]
    assert _close(
        s["query"],
        _colour(
            json.loads((out / rs.READER_KEY_FILE).read_text())["cases"][plan[1]["case"]]["row"]
        ),
    )
    # the choices are cleared for the next case
    assert browser.execute_script("return document.querySelector('#choices input:checked')") is None
    assert (
        Select(browser.find_element(By.ID, "confidence")).first_selected_option.get_attribute(
            "value"
        )
        == ""
    )


def test_token_is_passed_on_and_a_missing_image_is_reported(browser, study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    plan = rs.schedule(out, RATER_X)
    key = json.loads((out / rs.READER_KEY_FILE).read_text())
    public = json.loads((out / rs.READER_STUDY_FILE).read_text())
    first = next(c for c in public["cases"] if c["case"] == plan[0]["case"])
    key["images"][first["image"]] = str(tmp_path / "gone.png")  # the case image's file is gone
    (out / rs.READER_KEY_FILE).write_text(json.dumps(key))
    with live_server(lambda port: rs.create_reader_app(out, port=port, token="s&3")) as base:
        _start(browser, base + "/reader/?token=s%263", RATER_X)
        _message(browser, "image could not be loaded")
        state = _state(browser)
        assert state["shown"] and "token=s%263" in state["query_src"]


def test_the_time_of_a_case_starts_when_its_image_is_on_screen(browser, study, tmp_path):
    import asyncio

    out = tmp_path / "study"
    shutil.copytree(study[0], out)
    delay = 1.5

    def slow_images(port):
        app = rs.create_reader_app(out, port=port)

        @app.middleware("http")
        async def late(request, call_next):  # a slow network: every image arrives late
            if "/image/" in request.url.path:
                await asyncio.sleep(delay)
            return await call_next(request)

        return app

    with live_server(slow_images) as base:
        began = time.monotonic()
        _start(browser, base + "/reader/", RATER_X)
        _wait_step(browser, 0, 8)
        _by_keyboard(browser, CHOICES[2], 1)
        _wait(browser, lambda d: len(_readings(out)) == 1, timeout=30)
        wall = time.monotonic() - began
    seconds = _readings(out)[0]["seconds"]
    assert wall > delay and 0 < seconds < delay / 2, (wall, seconds)  # the wait is not counted
