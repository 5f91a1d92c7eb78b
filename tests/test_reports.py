"""Streamed answers (SSE), frame sequences with the stability window, PDF reports and batch CSVs, against the real
`drspot serve` (its front and the Bento behind it) of tests/serving_fixtures.py."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving_fixtures import API_KEY

pytestmark = pytest.mark.slow
BOM = b"\xef\xbb\xbf"


def _photos(deployed) -> list[Path]:
    return sorted((deployed["root"] / "ds" / "images").glob("*.jpg"))


def _predict(server, data: bytes, **params) -> dict:
    r = httpx.post(f"{server.url}/predict", files={"image": ("x.jpg", data, "image/jpeg")}, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _events(server, data: bytes, **params) -> list[tuple[str, dict, int]]:
    """The stream's events as (name, payload, index of the network read that completed it)."""
    out, buf = [], ""
    files = {"image": ("x.jpg", data, "image/jpeg")}
    with httpx.stream("POST", f"{server.url}/predict/stream", files=files, params=params, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for k, chunk in enumerate(r.iter_text()):
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.splitlines())
                out.append((fields["event"], json.loads(fields["data"]), k))
    assert buf == ""
    return out


def test_the_stream_sends_each_stage_as_it_is_known_and_ends_with_the_answer_predict_gives(server, deployed):
    data = _photos(deployed)[0].read_bytes()
    events = _events(server, data, language="ko")
    names = [n for n, _, _ in events]
    done = events[-1][1]
    lesions = len(done["lesions"])
    assert names == ["quality", "detection", *["classification"] * lesions, "guidance", "done"]
    byname = {n: p for n, p, _ in events}
    assert byname["quality"]["request_id"] == done["request_id"]
    assert byname["quality"]["image"]["sha256"] == done["image"]["sha256"]
    assert byname["detection"]["fallback"] == done["fallback"]
    assert len(byname["detection"]["boxes"]) == (0 if done["fallback"] else lesions)
    for (_, c, _), lesion in zip(events[2 : 2 + lesions], done["lesions"], strict=True):
        assert {k: v for k, v in c.items() if k not in ("index", "of")} == lesion
    assert byname["guidance"]["guidance"] == done["guidance"] and done["guidance"]["language"] == "ko"
    # streamed through `drspot serve`'s front: the first event arrived in a read before the last one (not one body)
    assert events[0][2] < events[-1][2]
    # the same answer as /predict (the stream classifies lesion by lesion, /predict in one batch)
    plain = _predict(server, data, language="ko")
    assert [les["box"] for les in plain["lesions"]] == [les["box"] for les in done["lesions"]]
    for a, b in zip(plain["lesions"], done["lesions"], strict=True):
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) < 1e-4
    # logged like any answer: its report exists
    assert httpx.get(f"{server.url}/report/{done['request_id']}.pdf", timeout=60).status_code == 200


def test_a_refused_stream_is_a_plain_error_before_any_event(server):
    r = httpx.post(f"{server.url}/predict/stream", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.headers["content-type"] == "application/json"
    assert "multipart/form-data" in r.json()["detail"]
    r = httpx.post(f"{server.url}/predict/stream", files={"image": ("n.txt", b"not a photo", "text/plain")})
    assert r.status_code in (415, 422) and "not an image" in r.json()["error"] + r.json()["detail"]
    r = httpx.post(f"{server.url}/predict/stream", json={"image": "abc", "language": "fr"})
    assert r.status_code == 422 and r.json()["detail"] == "language='fr' is not offered; use one of en, ko, vi"
    r = httpx.post(f"{server.url}/predict/stream", json={"photo": "abc"})
    assert r.status_code == 422 and r.json()["error"] == "missing field 'image'"


def _pdf_page(body: bytes):
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(body)
    return pdf, pdf[0]


def _pdf_text(body: bytes) -> str:
    """Every page's text, lines joined by spaces."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(body)
    try:
        return " ".join(pdf[i].get_textpage().get_text_bounded().replace("\r\n", " ") for i in range(len(pdf)))
    finally:
        pdf.close()


def _inked(page, bitmap, scale: float, text: str) -> float:
    """The share of the characters of ``text`` (its first occurrence on the page) whose box holds dark pixels in
    the rendered page: 1.0 when every glyph was drawn."""
    import numpy as np

    tp = page.get_textpage()
    found = tp.search(text).get_next()
    assert found is not None, f"{text!r} is not in the PDF's text"
    start, count = found
    gray = np.asarray(bitmap.convert("L"))
    height = page.get_height()
    inked = 0
    for i in range(start, start + count):
        left, bottom, right, top = tp.get_charbox(i)
        if right - left < 0.5:  # a space
            inked += 1
            continue
        box = gray[
            int((height - top) * scale) : int((height - bottom) * scale) + 1, int(left * scale) : int(right * scale) + 1
        ]
        inked += int(box.size > 0 and box.min() < 128)
    return inked / count


def test_the_pdf_report_renders_the_label_photo_and_korean_text(server, deployed):
    data = _photos(deployed)[1].read_bytes()
    answer = _predict(server, data, language="ko")
    url = f"{server.url}/report/{answer['request_id']}.pdf"
    r = httpx.get(url, params={"language": "ko"}, headers={"X-API-Key": API_KEY}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/pdf"
    assert r.content.startswith(b"%PDF-")
    pdf, page = _pdf_page(r.content)
    scale = 3
    bitmap = page.render(scale=scale).to_pil()
    text = _pdf_text(r.content)
    top = max(answer["lesions"], key=lambda les: les["malignant_probability"])
    assert "DrSpot 병변 보고서" in text and answer["request_id"] in text
    assert answer["models"]["classifier"] in text and "decision-support tool" in text
    assert top["label"] in text and answer["guidance"]["text"][:20] in text
    # drawn, not only present as text: every glyph of the label, and of the Korean title, has ink on the page
    assert _inked(page, bitmap, scale, top["label"]) == 1.0
    assert _inked(page, bitmap, scale, "병변 보고서") == 1.0
    # the photo (stored by this test server) with its boxes
    images = list(page.get_objects(filter=[3]))  # FPDF_PAGEOBJ_IMAGE
    assert len(images) == 1
    pdf.close()
    # without the reviewer key: the result, not the photo (patient data)
    anonymous = httpx.get(url, params={"language": "en"}, timeout=60)
    pdf, page = _pdf_page(anonymous.content)
    assert anonymous.status_code == 200 and not list(page.get_objects(filter=[3]))
    assert "shown only with the reviewer key" in _pdf_text(anonymous.content)
    pdf.close()


def test_a_report_of_an_unknown_request_or_with_bad_patient_fields_is_refused(server, deployed):
    r = httpx.get(f"{server.url}/report/0123abc.pdf")
    assert r.status_code == 404 and r.json() == {
        "error": "unknown request_id",
        "detail": "no prediction '0123abc' is logged",
    }
    answer = _predict(server, _photos(deployed)[2].read_bytes())
    url = f"{server.url}/report/{answer['request_id']}.pdf"
    r = httpx.post(url, json={"patient": {"name": "A", "ssn": "123"}})
    assert r.status_code == 422 and "unknown patient field(s) ssn" in r.json()["detail"]
    r = httpx.post(url, json={"patient": {"name": 5}})
    assert r.status_code == 422 and r.json()["detail"] == "patient.name must be text (got int)"
    r = httpx.post(url, json={"patient": {"name": "A"}, "consent": "yes"})
    assert r.status_code == 422 and r.json()["error"] == "invalid consent"


def _stored_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (root / ".drspot").glob("predictions.db*"))


def test_patient_fields_are_printed_and_stored_only_with_consent(server, deployed):
    from sqlalchemy import create_engine, text

    answer = _predict(server, _photos(deployed)[3].read_bytes(), language="vi")
    url = f"{server.url}/report/{answer['request_id']}.pdf"
    patient = {"name": "Nguyễn Thị Lan", "patient_id": "P-4711-nc", "birth_date": "1961-04-02", "sex": "F"}
    r = httpx.post(url, json={"patient": patient, "consent": False, "language": "vi"}, timeout=60)
    assert r.status_code == 200
    shown = _pdf_text(r.content)
    assert "Nguyễn Thị Lan" in shown and "P-4711-nc" in shown and "Báo cáo tổn thương DrSpot" in shown
    eng = create_engine(f"sqlite:///{deployed['root'] / '.drspot' / 'predictions.db'}")
    with eng.connect() as c:
        kept = c.execute(text("select count(*) from patients where request_id = :r"), {"r": answer["request_id"]})
        assert kept.scalar() == 0
    assert b"P-4711-nc" not in _stored_bytes(deployed["root"])
    assert "P-4711-nc" not in _pdf_text(httpx.get(url, timeout=60).content)
    # with consent: kept, and every later report of the request shows them to a reviewer; storing needs the key
    consented = {"patient": {**patient, "patient_id": "P-4711-ok"}, "consent": True}
    refused = httpx.post(url, json=consented, timeout=60)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorised"
    key = {"X-API-Key": API_KEY}
    r = httpx.post(url, json=consented, headers=key, timeout=60)
    assert r.status_code == 200
    assert "P-4711-ok" in _pdf_text(httpx.get(url, headers=key, timeout=60).content)
    assert "P-4711-ok" not in _pdf_text(httpx.get(url, timeout=60).content)  # a request id alone shows no identity
    with eng.connect() as c:
        fields = c.execute(text("select fields from patients where request_id = :r"), {"r": answer["request_id"]})
        assert json.loads(fields.scalar())["patient_id"] == "P-4711-ok"


def test_the_batch_csv_has_a_bom_and_one_row_per_lesion_of_each_request(server, deployed):
    answers = [_predict(server, p.read_bytes(), language="vi") for p in _photos(deployed)[4:6]]
    ids = [a["request_id"] for a in answers]
    r = httpx.get(f"{server.url}/report/batch.csv", params={"ids": ",".join(ids), "language": "vi"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.content.startswith(BOM) and b"\r\n" in r.content
    rows = list(csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"), newline="")))
    assert [row["request_id"] for row in rows] == [a["request_id"] for a in answers for _ in a["lesions"]]
    assert all(row["created_at"].endswith("+00:00") for row in rows)  # UTC, said so (SQLite keeps no zone)
    for row, lesion in zip(rows, [les for a in answers for les in a["lesions"]], strict=True):
        assert row["label"] == lesion["label"] and row["risk"] == lesion["risk"]
        assert abs(float(row["malignant_probability"]) - lesion["malignant_probability"]) < 1e-9
    worst = max(answers[0]["lesions"], key=lambda les: les["malignant_probability"])
    first = next(row for row in rows if row["request_id"] == ids[0] and row["label"] == worst["label"])
    assert first["guidance"] == answers[0]["guidance"]["text"]  # Vietnamese, from the knowledge base
    posted = httpx.post(f"{server.url}/report/batch.csv", json={"request_ids": ids, "language": "vi"}, timeout=60)
    assert posted.content == r.content
    bad = httpx.get(f"{server.url}/report/batch.csv", params={"ids": f"{ids[0]},nope"})
    assert bad.status_code == 404 and bad.json()["detail"] == "not logged: nope"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _resized(data: bytes, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_frames_confirm_a_class_that_holds_and_log_the_last_frame(server, confident):
    data, answer = confident
    top = max(answer["lesions"], key=lambda les: les["malignant_probability"])
    frames = [{"image": _b64(data), "t": 0.5 * i} for i in range(8)]  # 3.5 s
    r = httpx.post(f"{server.url}/predict/frames", json={"frames": frames}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["confirmed"] and out["label"] == top["label"] and out["frames"] == 8
    assert out["run"]["first_frame"] == 0 and out["run"]["last_frame"] == 6 and out["run"]["held_s"] == 3.0
    assert out["reason"] == f"{top['label']} held 3.00 s over 7 frames"
    assert out["answer"]["request_id"] == out["request_id"] and out["answer"]["lesions"] == answer["lesions"]
    assert httpx.get(f"{server.url}/report/{out['request_id']}.pdf", timeout=60).status_code == 200
    # too short, and a gap: not confirmed, nothing logged, the reason says why
    short = httpx.post(f"{server.url}/predict/frames", json={"frames": frames[:4]}, timeout=120).json()
    assert not short["confirmed"] and "request_id" not in short
    assert short["reason"] == f"{top['label']} held only 1.50 of 3 s and 4 of 5 frames"
    gap = [{"image": _b64(data), "t": t} for t in (0, 0.5, 1.0, 1.5, 3.0, 3.5)]
    broken = httpx.post(f"{server.url}/predict/frames", json={"frames": gap}, timeout=120).json()
    assert not broken["confirmed"]
    assert "a gap of 1.50 s between frames 3 and 4 (more than 1 s) broke the run" in broken["reason"]


def test_bad_frame_sequences_are_refused_naming_the_frame(server, confident):
    data, _ = confident
    url = f"{server.url}/predict/frames"
    mixed = [{"image": _b64(data), "t": 0}, {"image": _b64(_resized(data, (320, 240))), "t": 0.5}]
    w, h = Image.open(io.BytesIO(data)).size
    r = httpx.post(url, json={"frames": mixed}, timeout=60)
    assert r.status_code == 422 and r.json() == {
        "error": "frames differ in size",
        "detail": f"frame 1 is 320x240, frame 0 is {w}x{h}: the frames of one sequence come from one camera",
    }
    back = [{"image": _b64(data), "t": 1.0}, {"image": _b64(data), "t": 0.5}]
    r = httpx.post(url, json={"frames": back}, timeout=60)
    assert (
        r.status_code == 422
        and r.json()["detail"] == "frame 1 (t=0.5) is not after frame 0 (t=1): send frames in order"
    )
    corrupt = [{"image": _b64(data), "t": 0}, {"image": _b64(b"\xff\xd8 broken"), "t": 0.5}]
    r = httpx.post(url, json={"frames": corrupt}, timeout=60)
    assert r.status_code in (415, 422) and r.json()["detail"].startswith("frame 1: ")
    r = httpx.post(url, json={"frames": [{"image": _b64(data)}]}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"] == 'frame 0: send {"image": "<base64>", "t": <seconds>}'
    r = httpx.post(url, json={"frames": [{"image": _b64(data), "t": i} for i in range(121)]}, timeout=60)
    assert r.status_code == 422 and r.json()["detail"] == "121 frames; at most 120 in one request"


def test_the_frames_of_a_sequence_share_one_pixel_budget(server):
    """Seven 6 MP frames are 42 MP together, over the 40 MP a request may decode: refused from their headers
    before the seventh is decoded, naming the budget."""
    buf = io.BytesIO()
    Image.new("RGB", (3000, 2000), (180, 120, 100)).save(buf, "JPEG", quality=50)
    frames = [{"image": _b64(buf.getvalue()), "t": i * 0.5} for i in range(7)]
    r = httpx.post(f"{server.url}/predict/frames", json={"frames": frames}, timeout=120)
    assert r.status_code == 422 and r.json()["error"] == "frames have too many pixels", r.text[:300]
    assert r.json()["detail"].startswith("frame 6: the first 7 frames hold 42,000,000 pixels together")
