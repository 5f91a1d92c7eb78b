"""The review queue: ranking, the reviewer key, boxes in feedback (and refused boxes), the reviewer page in a real
headless browser, and a corrected box reaching the detector's training data."""

from __future__ import annotations

import datetime as dt
import io
import shutil

import httpx
import pytest
from PIL import Image

from components.monitoring.review import rank
from tests.serving_fixtures import API_KEY

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def _row(rid: str, top: float, p_mal: float, ood: float = 0.5, variants=None, minutes: int = 0) -> dict:
    rest = (1 - top) / 6
    probs = {c: (top if c == "nv" else rest) for c in CLASSES}
    return {
        "request_id": rid,
        "created_at": dt.datetime(2026, 11, 30, 12, minutes, tzinfo=dt.UTC),
        "lesions": [
            {"label": "nv", "probabilities": probs, "malignant_probability": p_mal, "ood_score": ood, "box": None}
        ],
        "label": "nv",
        "confidence": top,
        "malignant_probability": p_mal,
        "variants": variants,
    }


def test_the_queue_ranks_what_a_confirmation_would_teach_first():
    rows = [
        _row("sure", top=0.97, p_mal=0.02),
        _row("uncertain", top=0.3, p_mal=0.05),
        _row("borderline", top=0.9, p_mal=0.41),
        _row("unusual", top=0.95, p_mal=0.03, ood=2.5),
        _row("corrections-disagree", top=0.95, p_mal=0.03, variants={"none": "nv", "color_constancy": "mel"}),
        _row("everything", top=0.3, p_mal=0.4, ood=3.0, variants={"none": "nv", "color_constancy": "mel"}),
    ]
    items = rank(rows, threshold=0.4, ood_threshold=2.0, limit=10)
    assert items[0]["request_id"] == "everything" and items[-1]["request_id"] == "sure"
    by = {i["request_id"]: i for i in items}
    assert (
        by["uncertain"]["parts"]["uncertainty"] > 0.8
        and "uncertain: top probability 0.30" in by["uncertain"]["reasons"]
    )
    assert by["borderline"]["parts"]["near_threshold"] == 0.95
    assert "malignant probability 0.41 near the threshold 0.40" in by["borderline"]["reasons"]
    assert by["unusual"]["parts"]["ood"] == 1.0 and "unusual photo: OOD score 2.50" in by["unusual"]["reasons"]
    assert by["corrections-disagree"]["parts"]["disagreement"] == 1.0
    assert by["sure"]["reasons"] == ["nothing stands out"]
    assert [i["request_id"] for i in rank(rows, 0.4, 2.0, limit=2)] == ["everything", items[1]["request_id"]]


def test_the_queue_mixes_classes_and_a_seeded_random_share():
    """25% of a 20-item queue is drawn at random (the same log, the same draw), the rest is dealt over the predicted
    classes: one class of near-identical uncertain photos cannot fill it."""

    def row(i: int, label: str, top: float) -> dict:
        r = _row(f"{label}-{i}", top=top, p_mal=0.02, minutes=i % 60)
        return {**r, "label": label, "lesions": [{**r["lesions"][0], "label": label}]}

    rows = [row(i, "nv", 0.3) for i in range(60)] + [row(i, "mel", 0.6) for i in range(10)]
    rows += [row(i, "bkl", 0.9) for i in range(30)]
    plain = rank(rows, 0.4, 2.0, limit=20)
    assert {i["label"] for i in plain} == {"nv"}  # the top scores alone: one kind of photo
    mixed = rank(rows, 0.4, 2.0, limit=20, random_share=0.25, spread="classes")
    assert len(mixed) == 20 and len({i["request_id"] for i in mixed}) == 20
    drawn = [i for i in mixed if i["random"]]
    assert len(drawn) == 5 and all(i["reasons"][0].startswith("random sample") for i in drawn)
    scored = [i["label"] for i in mixed if not i["random"]]
    assert scored[:3] == ["nv", "mel", "bkl"] and scored.count("mel") >= 5
    again = rank(list(reversed(rows)), 0.4, 2.0, limit=20, random_share=0.25, spread="classes")
    assert {i["request_id"] for i in again if i["random"]} == {i["request_id"] for i in drawn}
    assert rank(rows[:3], 0.4, 2.0, limit=20, random_share=0.25, spread="classes")[0]["request_id"] in {
        r["request_id"] for r in rows[:3]
    }


def test_the_queue_spread_over_clusters_covers_the_traffic_in_proportion():
    """Three kinds of photo (embeddings far apart), 60 / 30 / 10 of the traffic; the uncertain ones all of one kind.
    By score alone the queue is that kind only; spread over clusters it holds each kind about as often as the traffic
    does, and within a kind the most uncertain come first."""
    import numpy as np

    rng = np.random.default_rng(0)
    centres = {"a": np.eye(16)[0] * 10, "b": np.eye(16)[1] * 10, "c": np.eye(16)[2] * 10}
    rows = []
    for kind, n, top in (("a", 60, 0.9), ("b", 30, 0.9), ("c", 10, 0.3)):
        for i in range(n):
            r = _row(f"{kind}-{i}", top=top - 0.001 * i, p_mal=0.02, minutes=i % 60)
            rows.append({**r, "embedding": (centres[kind] + rng.normal(0, 0.5, 16)).tolist()})
    kind = lambda items: [i["request_id"][0] for i in items]  # noqa: E731
    assert set(kind(rank(rows, 0.4, 2.0, limit=10))) == {"c"}
    spread = rank(rows, 0.4, 2.0, limit=10, spread="clusters")
    counts = {k: kind(spread).count(k) for k in "abc"}
    assert counts["a"] >= 4 and counts["b"] >= 2 and counts["c"] >= 1, counts
    assert spread[0]["request_id"][0] == "c"  # the least sure kind's pick first
    assert rank(rows, 0.4, 2.0, limit=10, spread="clusters") == spread  # the same log, the same queue
    without = [{k: v for k, v in r.items() if k != "embedding"} for r in rows]  # rows logged without embeddings
    assert set(kind(rank(without, 0.4, 2.0, limit=10, spread="clusters"))) == {"c"}


def _predict(server, data: bytes, compare: bool = False) -> dict:
    r = httpx.post(
        f"{server.url}/predict",
        params={"compare": str(compare).lower()},
        files={"image": ("x.jpg", data, "image/jpeg")},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _photos(deployed, n: int) -> list[bytes]:
    out = []
    for p in sorted((deployed["root"] / "ds" / "images").glob("*.jpg")):
        try:
            Image.open(p).load()
        except OSError:
            continue
        out.append(p.read_bytes())
        if len(out) == n:
            return out
    return out


@pytest.mark.slow
def test_review_endpoint_needs_a_reviewer_key_and_feedback_keeps_a_valid_box(server, deployed):
    from serving.store import PredictionLog

    photos = _photos(deployed, 3)
    answers = [_predict(server, photos[0], compare=True), _predict(server, photos[1]), _predict(server, photos[2])]
    url = f"{server.url}/review"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-API-Key": "wrong"}).json()["error"] == "unauthorised"
    h = {"X-API-Key": API_KEY}
    assert httpx.get(url, params={"limit": 0}, headers=h).status_code == 422
    assert httpx.get(url, params={"since": "yesterday"}, headers=h).json()["error"] == "invalid since"
    later = httpx.get(url, params={"since": "2999-01-01T00:00:00+00:00"}, headers=h).json()
    assert later["items"] == [] and later["considered"] == 0  # only the cases logged since then: none
    q = httpx.get(url, params={"limit": 200}, headers=h).json()
    ids = [i["request_id"] for i in q["items"]]
    assert {a["request_id"] for a in answers} <= set(ids) and q["classes"] == CLASSES
    # monitor.review: a quarter drawn at random, the rest best first (spread over clusters of the photos' embeddings:
    # with room for every photo considered, each is its own cluster)
    assert sum(i["random"] for i in q["items"]) == round(min(200, q["considered"]) * 0.25)
    scored = [i for i in q["items"] if not i["random"]]
    scores = [i["score"] for i in scored]
    assert scores == sorted(scores, reverse=True)
    compared = next(i for i in q["items"] if i["request_id"] == answers[0]["request_id"])
    assert set(compared["parts"]) == {"uncertainty", "near_threshold", "ood", "disagreement"}
    # the stored photo, for the reviewer only
    img = f"{url}/{answers[1]['request_id']}/image"
    assert httpx.get(img).status_code == 401
    r = httpx.get(img, headers=h)
    assert r.status_code == 200 and r.content == photos[1]
    assert httpx.get(f"{url}/nope/image", headers=h).status_code == 404

    fb = f"{server.url}/feedback"
    base = {"request_id": answers[1]["request_id"], "confirmed_label": "mel", "reviewer": "dr.lee"}
    for bad in ([0.2, 0.2, 1.3, 0.8], [0.6, 0.2, 0.4, 0.8], [0.1, 0.2, 0.3], "0 0 1 1"):
        r = httpx.post(fb, json={**base, "box": bad}, headers=h)
        assert r.status_code == 422 and r.json()["error"] in ("box outside the image", "invalid box"), (bad, r.text)
    assert httpx.post(fb, json={**base, "box": [0.1, 0.2, 0.6, 0.7]}).status_code == 401
    log = PredictionLog(f"sqlite:///{deployed['root'] / '.drspot' / 'predictions.db'}")
    assert base["request_id"] not in {c["request_id"] for c in log.confirmed()}  # nothing stored by the refusals
    r = httpx.post(fb, json={**base, "box": [0.1, 0.2, 0.6, 0.7]}, headers=h)
    assert r.status_code == 201 and r.json()["box"] == [0.1, 0.2, 0.6, 0.7]
    confirmed = {c["request_id"]: c for c in log.confirmed()}
    assert confirmed[base["request_id"]]["box"] == [0.1, 0.2, 0.6, 0.7]
    # confirmed cases leave the queue
    after = httpx.get(url, params={"limit": 200}, headers=h).json()
    assert base["request_id"] not in [i["request_id"] for i in after["items"]]
    assert log.get(answers[0]["request_id"])["variants"].keys() == {"none", "color_constancy"}


@pytest.mark.slow
def test_the_reviewer_page_confirms_a_label_and_draws_a_box(server, deployed, tmp_path):
    from serving.store import PredictionLog
    from tests.test_web import ARGS, CHROMIUM

    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (make test installs it with apt when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    _predict(server, _photos(deployed, 5)[4])  # at least one case to review
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server.url + "/reviewer?limit=5")
        page.fill("#key", "wrong")
        page.click("#load")
        page.wait_for_selector("#error:not([hidden])")
        assert "unauthorised" in page.inner_text("#error")
        page.fill("#key", API_KEY)
        page.fill("#reviewer", "dr.park")
        page.click("#load")
        page.wait_for_selector("#queue li")
        assert len(page.query_selector_all("#queue li")) <= 5
        first = page.query_selector("#queue li")  # the case the queue ranks first
        rid = first.get_attribute("data-request-id")
        assert first.get_attribute("data-rank") == "1" and page.inner_text("#queue li:first-child .why").strip()
        first.click()
        page.wait_for_selector("#case:not([hidden])")
        # drag a box from 20%/30% to 70%/80% of the photo (in view: the queue's reasons may push it down the page)
        page.locator("#canvas").scroll_into_view_if_needed()
        b = page.locator("#canvas").bounding_box()
        page.mouse.move(b["x"] + 0.2 * b["width"], b["y"] + 0.3 * b["height"])
        page.mouse.down()
        page.mouse.move(b["x"] + 0.5 * b["width"], b["y"] + 0.5 * b["height"], steps=4)
        page.mouse.move(b["x"] + 0.7 * b["width"], b["y"] + 0.8 * b["height"], steps=4)
        page.mouse.up()
        page.select_option("#label", "bcc")
        page.click("#submit")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('Saved feedback')")
        page.screenshot(path=str(tmp_path / "review.png"))
        browser.close()
    log = PredictionLog(f"sqlite:///{deployed['root'] / '.drspot' / 'predictions.db'}")
    c = {x["request_id"]: x for x in log.confirmed()}[rid]
    assert c["confirmed_label"] == "bcc" and c["reviewer"] == "dr.park"
    x0, y0, x1, y1 = c["box"]
    assert abs(x0 - 0.2) < 0.03 and abs(y0 - 0.3) < 0.03 and abs(x1 - 0.7) < 0.03 and abs(y1 - 0.8) < 0.03


def test_a_reviewed_box_reaches_the_detectors_training_data(tmp_path, cfg):
    """Feedback with a box -> export -> ingest (feedback adapter) -> the manifest row has the box, which the YOLO
    export keeps; a label-only confirmation stays box-less (left out of the detector's data)."""
    import pyarrow.parquet as pq

    from components.data.ingest import ingest
    from components.monitoring import feedback

    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        Image.effect_noise((96, 72), 40 + seed).convert("RGB").save(buf, format="JPEG")
        return buf.getvalue()

    cases = []
    for i, box in enumerate(([0.1, 0.2, 0.6, 0.7], None)):
        src = tmp_path / f"img{i}.jpg"
        src.write_bytes(jpeg(i))
        cases.append(feedback.Case(f"fb_{i:020d}", "mel", str(src), f"r{i}", "dr", "", "nv", f"{i:064d}", box=box))
    feedback.export(cases, tmp_path / "batch")
    ingest("feedback", tmp_path / "batch", tmp_path / "ds", cfg)
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "ds" / "manifest.parquet").to_pylist()}
    assert rows["fb_00000000000000000000"]["boxes"] == [[0.1, 0.2, 0.6, 0.7]]
    assert not rows["fb_00000000000000000001"]["boxes"]
