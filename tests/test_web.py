"""The web page at / in a real headless Chromium (Debian's, driven by Playwright): upload, boxes,
probability bars, risk, fallback notice, quality warnings, guidance, disclaimer; and a refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

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
def playwright():
    """One Playwright driver for the module (a second one cannot start beside it)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing (make test installs it with apt when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    yield b
    b.close()


def test_upload_shows_boxes_bars_risk_guidance_and_disclaimer(browser, server, deployed, tmp_path):
    photo = sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))[0]
    # smaller than every photo the model was trained on (and than serving.low_resolution_side): a warning to show
    Image.open(photo).resize((80, 60)).save(tmp_path / "lesion.jpg", quality=92)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.select_option("#language", "en")
    page.set_input_files("#file", str(tmp_path / "lesion.jpg"))
    page.wait_for_selector("#result:not([hidden])", timeout=30000)
    assert page.inner_text("#risk") in ("low", "medium", "high")
    # the answer arrived as a stream: each stage listed as it came
    stages = [li.get_attribute("data-event") for li in page.query_selector_all("#stages li")]
    lesions = stages.count("classification")
    assert stages == ["quality", "detection", *["classification"] * lesions, "guidance", "done"] and lesions >= 1
    label = page.inner_text("#label")
    bars = page.query_selector_all("#bars .bar")
    assert len(bars) == 7  # sorted, top class first; named as the label unless the answer abstains
    top = bars[0].get_attribute("data-cls")
    if page.is_visible("#abstain"):
        assert label.startswith(f"not reported ({top} at") and "No class reported (" in page.inner_text("#abstain")
    elif label != top:  # the answer weighs rare classes up (logit adjustment): the page says so, naming the top bar
        assert f"most probable: {top}" in page.inner_text("#label-note")
    else:
        assert page.inner_text("#label-note") == ""
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


def test_photos_of_one_session_give_a_table_a_csv_and_pdf_reports(browser, server, deployed, tmp_path):
    photos = sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))[:5]
    for k, photo in enumerate(photos):
        shutil.copy(photo, tmp_path / f"lesion-{k}.jpg")
    page = browser.new_page()
    page.goto(server.url + "/")
    page.select_option("#language", "ko")
    page.set_input_files("#file", [str(tmp_path / f"lesion-{k}.jpg") for k in range(5)])
    page.wait_for_function("document.querySelectorAll('#batch-rows tr').length === 4", timeout=60000)
    page.wait_for_selector("#status:has-text('first four')", timeout=10000)  # the fifth is not sent, and it says so
    rows = page.query_selector_all("#batch-rows tr")
    ids = [r.get_attribute("data-request-id") for r in rows]
    assert [r.query_selector("td").inner_text() for r in rows] == [f"lesion-{k}.jpg" for k in range(4)]
    csv_url = page.get_attribute("#csv", "href")
    got = page.request.get(server.url + csv_url if csv_url.startswith("/") else csv_url)
    assert got.ok and got.body().startswith(b"\xef\xbb\xbf")
    text = got.body().decode("utf-8-sig")
    assert all(i in text for i in ids) and text.splitlines()[0].startswith("request_id,created_at,")
    pdf = page.request.get(server.url + rows[0].query_selector("a").get_attribute("href"))
    assert pdf.ok and pdf.headers["content-type"] == "application/pdf" and pdf.body().startswith(b"%PDF-")
    assert page.get_attribute("#report", "href") == f"/report/{ids[-1]}.pdf?language=ko"


def _y4m(photo: bytes, path: Path, frames: int = 10, fps: int = 10) -> None:
    """A raw video file of the photo standing still (YUV 4:2:0), for Chromium's fake camera."""
    import io

    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(photo)).convert("RGB")
    w, h = img.size[0] // 2 * 2, img.size[1] // 2 * 2
    ycc = np.asarray(img.resize((w, h)).convert("YCbCr"), dtype=np.float32)
    planes = [ycc[..., 0]] + [ycc[..., c].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) for c in (1, 2)]
    frame = b"FRAME\n" + b"".join(np.clip(p.round(), 0, 255).astype(np.uint8).tobytes() for p in planes)
    path.write_bytes(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode() + frame * frames)


def test_camera_mode_confirms_a_class_held_still_in_front_of_a_fake_camera(playwright, server, confident, tmp_path):
    data, _ = confident
    video = tmp_path / "lesion.y4m"
    _y4m(data, video)
    camera = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    b = playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=[*ARGS, *camera, f"--use-file-for-fake-video-capture={video}"]
    )
    try:
        page = b.new_page()
        page.goto(server.url + "/")
        page.click("#camera-start")
        page.wait_for_selector("#video:not([hidden])", timeout=10000)
        page.wait_for_selector("#camera-status[data-confirmed='true']", timeout=60000)
        # the camera's frames are the photo re-encoded (YUV 4:2:0, then JPEG in the page): the class is the one
        # the service confirmed for them, shown as the answer
        status = page.inner_text("#camera-status")
        label = status.removeprefix("Confirmed: ").split(" ")[0]
        assert label in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
        assert status.startswith(f"Confirmed: {label} ({label} held ") and " s over " in status
        assert page.is_visible("#result") and page.inner_text("#label") == label
        assert page.is_hidden("#video")  # the camera is released once a class is confirmed
        row = page.query_selector("#batch-rows tr")
        assert row.query_selector("td").inner_text() == "camera" and row.get_attribute("data-request-id")
    finally:
        b.close()
