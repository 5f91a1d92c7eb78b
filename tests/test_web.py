"""The web page at / in a real headless Chromium (Debian's, driven by Playwright): upload, boxes,
probability bars, risk, fallback notice, quality warnings, guidance, disclaimer; and a refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (make test installs it with apt when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def test_upload_shows_boxes_bars_risk_guidance_and_disclaimer(browser, server, deployed, tmp_path):
    photo = sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))[0]
    shutil.copy(photo, tmp_path / "lesion.jpg")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.select_option("#language", "en")
    page.set_input_files("#file", str(tmp_path / "lesion.jpg"))
    page.wait_for_selector("#result:not([hidden])", timeout=30000)
    assert page.inner_text("#risk") in ("low", "medium", "high")
    label = page.inner_text("#label")
    bars = page.query_selector_all("#bars .bar")
    assert len(bars) == 7  # sorted, top class first; named as the label unless the answer abstains
    top = bars[0].get_attribute("data-cls")
    if page.is_visible("#abstain"):
        assert label.startswith(f"not reported ({top} at") and "No class reported (" in page.inner_text("#abstain")
    else:
        assert label == top
    assert page.inner_text("#guidance").strip() and "knowledge base" in page.inner_text("#guidance-source")
    assert "decision-support tool" in page.inner_text("#disclaimer")
    boxes = int(page.get_attribute("#canvas", "data-boxes"))
    fallback_shown = page.is_visible("#fallback")
    assert (boxes == 0) == fallback_shown  # either boxes drawn, or the fallback notice says why
    assert page.is_visible("#warnings") and "low resolution" in page.inner_text("#warnings")
    assert "drspot-classifier/" in page.inner_text("#models")
    page.screenshot(path=str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_refused_upload_is_explained(browser, server, tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#file", str(tmp_path / "notes.txt"))
    page.wait_for_selector("#error:not([hidden])", timeout=30000)
    assert "not an image" in page.inner_text("#error") and page.is_hidden("#result")


def test_a_photo_that_is_no_lesion_is_shown_as_not_reported(browser, server, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 240), "white")
    for k in range(8):
        ImageDraw.Draw(img).text((10, 10 + 28 * k), "Invoice 2026-11  total 41.90 EUR  thank you" * 2, fill="black")
    img.save(tmp_path / "invoice.png")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.set_input_files("#file", str(tmp_path / "invoice.png"))
    page.wait_for_selector("#result:not([hidden])", timeout=30000)
    assert "No class reported (not_dermoscopic_lesion)" in page.inner_text("#abstain")
    assert page.inner_text("#label").startswith("not reported (")
    assert len(page.query_selector_all("#bars .bar")) == 7  # the probabilities stay visible
