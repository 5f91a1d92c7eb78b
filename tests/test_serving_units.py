"""The service's request-path pieces on their own, without a model or a server (the fast suite): the image checks a
hostile upload meets first, the one error handler every route refuses through, and the PDF/CSV reports."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from fastapi import Request  # at module level: the test routes' annotations are resolved from here
from PIL import Image

from serving.inputs import InputError, check_length, from_base64, read_image


def _jpeg(w: int = 160, h: int = 120) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (the bytes after it do not matter: the size is refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _refused(data: bytes, s) -> InputError:
    with pytest.raises(InputError) as e:
        read_image(data, s)
    return e.value


def test_an_upload_is_checked_cheapest_first_and_each_refusal_says_what_was_wrong(cfg):
    s = cfg.serving
    up = read_image(_jpeg(), s)
    assert up.format == "JPEG" and up.rgb.size == (160, 120) and len(up.sha256) == 64
    assert set(up.quality) >= {"blur", "brightness"}
    e = _refused(b"", s)
    assert (e.status, e.reason) == (400, "empty")
    e = _refused(b"%PDF-1.7 not a photo", s)
    assert e.status == 415 and "send one of" in e.detail
    e = _refused(_png_header(9_000, 9_000), s)  # 81 MP claimed in a few bytes: refused from the header
    assert e.status == 422 and e.reason == "too_many_pixels" and "checked before decoding" in e.detail
    whole = _jpeg()
    e = _refused(whole[: len(whole) * 2 // 3], s)  # a real JPEG cut off: its header reads, its pixels do not
    assert e.status == 422 and e.error == "image is truncated or corrupt", e
    e = _refused(_jpeg(8, 8), s)
    assert (e.status, e.reason) == (422, "too_small") and "8x8" in e.detail
    with pytest.raises(InputError) as big:
        check_length(str(10**10), s)
    assert big.value.status == 413 and f"{s.max_body_mb:g} MB" in big.value.detail
    with pytest.raises(InputError) as b64:
        from_base64("not base64!")
    assert (b64.value.status, b64.value.reason) == (422, "bad_base64")


def test_every_route_refuses_through_one_handler_with_the_contracts_body(cfg):
    from fastapi import APIRouter

    from serving.app import REJECTIONS, REQUESTS, app

    router = APIRouter()

    @router.get("/_test/refuse/{request_id}.pdf")
    async def refuse(request_id: str):
        raise InputError(404, "unknown request_id", f"no prediction {request_id!r} is logged", "unknown")

    app.include_router(router)
    before = REJECTIONS.labels(reason="unknown")._value.get()
    counted = REQUESTS.labels(endpoint="/_test/refuse/{request_id}.pdf", status="404")
    before_counted = counted._value.get()
    transport = httpx.ASGITransport(app=app)

    async def call():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/_test/refuse/abc.pdf"), await client.get("/_test/refuse/x.pdf?q=1")

    import anyio

    first, _ = anyio.run(call)
    assert first.status_code == 404
    assert first.json() == {"error": "unknown request_id", "detail": "no prediction 'abc' is logged"}
    assert REJECTIONS.labels(reason="unknown")._value.get() == before + 2
    # counted under the route's template, not each request id (the metric's labels stay bounded)
    assert counted._value.get() == before_counted + 2


def test_the_pdf_report_and_the_batch_csv_of_a_logged_row():
    import datetime as dt

    from serving.patient_report import csv_bytes, pdf

    lesion = {
        "box": [0.1, 0.2, 0.6, 0.7],
        "detector_confidence": 0.91,
        "label": "mel",
        "risk": "high",
        "malignant_probability": 0.81,
        "probabilities": {"mel": 0.7, "nv": 0.2, "bkl": 0.1},
    }
    row = {
        "request_id": "0123abcd",
        "created_at": dt.datetime(2026, 12, 5, 18, 0, tzinfo=dt.UTC),
        "lesions": [lesion],
        "label": "mel",
        "risk": "high",
        "malignant_probability": 0.81,
        "quality": {"blur": 120.0, "brightness": 0.5},
        "classifier_version": "drspot-classifier/3",
        "detector_version": "drspot-detector/2",
    }
    common = {"guidance": {"text": "See a dermatologist soon."}, "warnings": [], "disclaimer": "Not a diagnosis."}
    with_photo = pdf(row, language="ko", abstain=None, photo=_jpeg(), patient={"name": "Kim"}, **common)
    without = pdf(row, language="en", abstain="uncertain", photo=None, photo_note="not stored", **common)
    assert with_photo.startswith(b"%PDF-") and without.startswith(b"%PDF-")
    assert len(with_photo) > len(without) + 2000  # the photo is in one of them
    text = csv_bytes(
        [{"request_id": "0123abcd", "label": "mel", "guidance": "Bác sĩ"}], ["request_id", "label", "guidance"]
    )
    assert text.startswith(b"\xef\xbb\xbf") and b"\r\n" in text and "Bác sĩ".encode() in text


def test_a_phones_mpo_jpeg_is_read_as_its_primary_photo(cfg):
    """Most current phones write JPEGs with an MPF block (a gain or depth map after the photo): Pillow opens them
    as MPO with two frames; the photo is the first."""
    photo = Image.new("RGB", (320, 240), (180, 120, 100))
    buf = io.BytesIO()
    photo.save(buf, "MPO", save_all=True, append_images=[Image.new("L", (160, 120), 0).convert("RGB")])
    up = read_image(buf.getvalue(), cfg.serving)
    assert up.format == "JPEG" and up.decoded.rgb.size == (320, 240)
    assert not any("animated" in n for n in up.decoded.notes)
    assert abs(np.asarray(up.decoded.rgb)[120, 160].astype(int) - (180, 120, 100)).max() <= 3


def test_hostile_json_and_keys_get_a_4xx_not_a_500(cfg, monkeypatch):
    from fastapi import APIRouter

    from serving.app import app, json_object, require_reviewer

    monkeypatch.setenv(cfg.serving.feedback_key_env, "the-key")
    router = APIRouter()

    @router.post("/_test/json")
    async def body(request: Request):
        return await json_object(request)

    @router.get("/_test/key")
    async def key(request: Request):
        require_reviewer(request, "review")
        return {"ok": True}

    app.include_router(router)
    transport = httpx.ASGITransport(app=app)

    async def call():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            as_json = {"content-type": "application/json"}
            nested = await client.post("/_test/json", content=b"[" * 100_000 + b"]" * 100_000, headers=as_json)
            nan = await client.post("/_test/json", content=b'{"frames": [{"t": NaN}]}', headers=as_json)
            inf = await client.post("/_test/json", content=b'{"t": -Infinity}', headers=as_json)
            form = await client.post("/_test/json", content=b'{"t": 1}', headers={"content-type": "text/plain"})
            non_ascii = await client.get("/_test/key", headers={"X-API-Key": "clé".encode("latin-1")})
            right = await client.get("/_test/key", headers={"X-API-Key": "the-key"})
            return nested, nan, inf, form, non_ascii, right

    import anyio

    nested, nan, inf, form, non_ascii, right = anyio.run(call)
    assert form.status_code == 415 and form.json()["detail"] == "got text/plain; send application/json"
    assert nested.status_code == 400 and nested.json()["detail"].startswith("nested too deeply")
    assert nan.status_code == 400 and "NaN is not a JSON number" in nan.json()["detail"]
    assert inf.status_code == 400 and "-Infinity is not a JSON number" in inf.json()["detail"]
    assert non_ascii.status_code == 401 and non_ascii.json()["error"] == "unauthorised"
    assert right.status_code == 200


def test_colour_constancy_works_in_bands_with_the_same_answer():
    """`preprocess=color_constancy` on a 20 MP photo held ~1.4 GB of float64 copies at once (72 bytes a pixel); in
    bands of rows it needs the photo's uint8 copies and a band's floats, and gives the same pixels."""
    import tracemalloc

    from serving.pipeline import color_constancy

    def whole(rgb, power=6):  # the formula on the whole photo at once, as it was
        a = np.asarray(rgb, dtype=np.float64)
        illum = np.power(np.mean(np.power(a, power), axis=(0, 1)), 1 / power)
        illum = illum / (np.linalg.norm(illum) + 1e-9)
        return np.clip(a / (illum * np.sqrt(3) + 1e-9), 0, 255).astype(np.uint8)

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 900, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(color_constancy(photo)), whole(photo))
    big = Image.new("RGB", (5000, 4000), (180, 120, 100))
    tracemalloc.start()
    color_constancy(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12 * 5000 * 4000, f"{peak / 2**20:.0f} MiB for 20 MP"


def test_low_resolution_is_judged_against_the_photos_the_model_was_trained_on(cfg):
    from components.monitoring.reference import quality_limits
    from serving.inputs import assess

    q = {"blur": 100.0, "brightness": 0.5}
    ham = {"blur": [100] * 99, "brightness": [0.5] * 99, "width": [200] * 99, "height": [150] * 99}
    only_ham = quality_limits(ham, 1.0, cfg.serving.low_resolution_side)
    assert only_ham["low_resolution_side"] == cfg.serving.low_resolution_side == 128  # never above the fixed side
    assert assess(q, 84, 84, cfg.serving.model_copy(update=only_ham)) == [
        "low resolution: 84x84; the classifier sees more detail in larger photos"
    ]
    # a retrain with a clinic's 84 px photos among its training photos: they are ordinary now
    both = {k: v + [v[0] if k in ("blur", "brightness") else 84] * 12 for k, v in ham.items()}
    with_bcn = quality_limits(both, 1.0, cfg.serving.low_resolution_side)
    assert with_bcn["low_resolution_side"] == 84
    assert assess(q, 84, 84, cfg.serving.model_copy(update=with_bcn)) == []
    assert assess(q, 60, 45, cfg.serving.model_copy(update=with_bcn))  # smaller than anything it saw: warned
    assert "low_resolution_side" not in quality_limits({"blur": [1], "brightness": [0.5]}, 1.0)  # older references
