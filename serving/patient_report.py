"""Reports of logged predictions: a PDF per request (``/report/{request_id}.pdf``) and the CSV of a batch.

The PDF shows the photo with the detector's boxes, each lesion's class probabilities, malignant probability and risk,
the photo's quality, the care guidance in the report's language, the model versions, the request, and the
disclaimer; optional patient fields are printed when given (they are stored only with the patient's consent, by
the service: ``serving/store.py``'s ``patients`` table). Fonts ship offline: DejaVu Sans (inside matplotlib) for
Latin and Vietnamese, NanumGothic (inside ``koreanize-matplotlib``) for Korean, which fpdf2 falls back to per glyph.
The CSV is the same one-row-per-lesion table ``drspot predict`` writes (``serving/batch.py``), UTF-8 with a BOM.
"""

from __future__ import annotations

import datetime as dt
import io
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

# what a report may carry about the patient: printed when given, stored only with consent
PATIENT_FIELDS = {"name": 120, "patient_id": 64, "birth_date": 32, "sex": 32, "notes": 500}

# the report's own words in each language of the knowledge base (the guidance text comes from the knowledge base)
WORDS: dict[str, dict[str, str]] = {
    "en": {
        "title": "DrSpot lesion report",
        "patient": "Patient",
        "name": "Name",
        "patient_id": "Patient ID",
        "birth_date": "Date of birth",
        "sex": "Sex",
        "notes": "Notes",
        "result": "Result",
        "lesion": "Lesion",
        "whole": "whole photo (no lesion box)",
        "label": "Answered class",
        "not_reported": "not reported",
        "risk": "Risk",
        "malignant": "Malignant probability",
        "probabilities": "Class probabilities",
        "quality": "Photo quality",
        "quality_ok": "no warnings",
        "guidance": "Guidance",
        "models": "Models",
        "request": "Request",
        "created": "Analysed",
        "no_photo": "Photo not available",
    },
    "ko": {
        "title": "DrSpot 병변 보고서",
        "patient": "환자",
        "name": "이름",
        "patient_id": "환자 번호",
        "birth_date": "생년월일",
        "sex": "성별",
        "notes": "메모",
        "result": "결과",
        "lesion": "병변",
        "whole": "사진 전체 (병변 상자 없음)",
        "label": "분류 결과",
        "not_reported": "보고하지 않음",
        "risk": "위험도",
        "malignant": "악성 확률",
        "probabilities": "분류별 확률",
        "quality": "사진 품질",
        "quality_ok": "경고 없음",
        "guidance": "안내",
        "models": "모델",
        "request": "요청",
        "created": "분석 시각",
        "no_photo": "사진 없음",
    },
    "vi": {
        "title": "Báo cáo tổn thương DrSpot",
        "patient": "Bệnh nhân",
        "name": "Họ tên",
        "patient_id": "Mã bệnh nhân",
        "birth_date": "Ngày sinh",
        "sex": "Giới tính",
        "notes": "Ghi chú",
        "result": "Kết quả",
        "lesion": "Tổn thương",
        "whole": "toàn bộ ảnh (không có khung tổn thương)",
        "label": "Kết quả phân loại",
        "not_reported": "không báo cáo",
        "risk": "Mức nguy cơ",
        "malignant": "Xác suất ác tính",
        "probabilities": "Xác suất theo phân loại",
        "quality": "Chất lượng ảnh",
        "quality_ok": "không có cảnh báo",
        "guidance": "Hướng dẫn",
        "models": "Mô hình",
        "request": "Yêu cầu",
        "created": "Thời điểm phân tích",
        "no_photo": "Không có ảnh",
    },
}
RISK_RGB = {"high": (192, 57, 43), "medium": (212, 138, 0), "low": (46, 139, 87)}


class ReportError(ValueError):
    """A report that cannot be made as asked (what was wrong)."""


@lru_cache(maxsize=1)
def fonts() -> dict[str, Path]:
    """The report's font files, from the packages that ship them (no download)."""
    import logging
    from importlib.util import find_spec

    import matplotlib

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # only koreanize-matplotlib's font folder is used: located, not imported (importing it sets matplotlib's fonts)
    spec = find_spec("koreanize_matplotlib")
    nanum = Path(spec.origin).parent / "fonts" if spec and spec.origin else Path("koreanize_matplotlib/fonts")
    found = {
        "dejavu": dejavu / "DejaVuSans.ttf",
        "dejavu-bold": dejavu / "DejaVuSans-Bold.ttf",
        "nanum": nanum / "NanumGothic.ttf",
        "nanum-bold": nanum / "NanumGothicBold.ttf",
    }
    # fpdf2 subsets the fonts with fontTools, which logs each hinting table it drops ("TSI2 NOT subset")
    logging.getLogger("fontTools").setLevel(logging.ERROR)
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise ReportError(
            f"the report's fonts are missing: {', '.join(missing)} (reinstall matplotlib and koreanize-matplotlib)"
        )
    return found


def utc(t: dt.datetime) -> dt.datetime:
    """A logged time in UTC: the log writes UTC, and SQLite gives it back without its zone."""
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def check_patient(fields: Any) -> dict[str, str]:
    """The patient fields of a report request: an object of known keys with short text values.

    Raises:
        ReportError: not an object, an unknown key, a value that is not text or is too long.
    """
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ReportError(f"patient must be an object with any of {', '.join(PATIENT_FIELDS)}")
    unknown = sorted(set(fields) - set(PATIENT_FIELDS))
    if unknown:
        raise ReportError(f"unknown patient field(s) {', '.join(unknown)}; use {', '.join(PATIENT_FIELDS)}")
    out = {}
    for k, v in fields.items():
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise ReportError(f"patient.{k} must be text (got {type(v).__name__})")
        if len(v) > PATIENT_FIELDS[k]:
            raise ReportError(f"patient.{k} is {len(v)} characters; at most {PATIENT_FIELDS[k]}")
        out[k] = v.strip()
    return out


def photo_with_boxes(data: bytes, lesions: list[dict[str, Any]]) -> Image.Image:
    """The photo (EXIF orientation applied, as the models saw it) with each lesion's box in its risk's colour."""
    from components.data.images import decode

    img = decode(data).rgb.copy()
    img.thumbnail((900, 900))
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for n, les in enumerate(lesions, 1):
        if les.get("box"):
            x0, y0, x1, y1 = les["box"]
            draw.rectangle(
                [x0 * w, y0 * h, x1 * w, y1 * h], outline=RISK_RGB.get(les["risk"], (0, 0, 0)), width=max(2, w // 150)
            )
            draw.text((x0 * w + 4, y0 * h + 2), str(n), fill=RISK_RGB.get(les["risk"], (0, 0, 0)))
    return img


class _Page:
    """One report document being written: the fonts, the words of its language, and the two line styles."""

    def __init__(self, language: str, title: str) -> None:
        from fpdf import FPDF

        self.t = WORDS.get(language, WORDS["en"])
        f = fonts()
        doc = FPDF(format="A4")
        doc.set_title(f"{self.t['title']} {title}")
        doc.set_creator("DrSpot")
        for name in ("dejavu", "nanum"):
            doc.add_font(name, "", str(f[name]))
            doc.add_font(name, "B", str(f[f"{name}-bold"]))
        doc.set_fallback_fonts(["nanum"], exact_match=False)
        doc.set_auto_page_break(True, margin=15)
        doc.add_page()
        self.doc = doc

    def heading(self, text: str, size: int = 13) -> None:
        self.doc.set_font("dejavu", "B", size)
        self.doc.multi_cell(0, 8, text, align="L", new_x="LMARGIN", new_y="NEXT")
        self.doc.set_font("dejavu", "", 10)

    def line(self, label: str, value: Any) -> None:
        self.doc.set_font("dejavu", "B", 10)
        self.doc.cell(55, 6, f"{label}:")
        self.doc.set_font("dejavu", "", 10)
        self.doc.multi_cell(0, 6, str(value), align="L", new_x="LMARGIN", new_y="NEXT")

    def text(self, value: str, height: int = 5) -> None:
        self.doc.multi_cell(0, height, value, align="L", new_x="LMARGIN", new_y="NEXT")


def _head(page: _Page, row: dict[str, Any], patient: dict[str, str] | None) -> None:
    t = page.t
    page.heading(t["title"], 17)
    created = row.get("created_at")
    if isinstance(created, dt.datetime):
        created = utc(created).strftime("%Y-%m-%d %H:%M UTC")
    page.line(t["request"], row["request_id"])
    page.line(t["created"], created)
    if patient:
        page.doc.ln(2)
        page.heading(t["patient"])
        for k in PATIENT_FIELDS:
            if patient.get(k):
                page.line(t[k], patient[k])
    page.doc.ln(2)


def _photo_and_result(page: _Page, row: dict[str, Any], abstain: str | None, photo: bytes | None, note: str | None):
    """The photo with its boxes (or why there is none) on the left, the result beside it."""
    doc, t = page.doc, page.t
    top_y = doc.get_y()
    if photo is not None:
        img = photo_with_boxes(photo, row["lesions"])
        width = 80
        doc.image(img, x=doc.l_margin, y=top_y, w=width)
        image_h = width * img.size[1] / img.size[0]
    else:
        doc.set_font("dejavu", "", 9)
        doc.multi_cell(80, 5, f"{t['no_photo']}: {note or ''}", border=1, align="L", new_x="LMARGIN", new_y="NEXT")
        image_h = doc.get_y() - top_y
    doc.set_xy(doc.l_margin + 86, top_y)
    right = doc.l_margin + 86
    doc.set_font("dejavu", "B", 13)
    doc.cell(0, 8, t["result"], new_x="LEFT", new_y="NEXT")
    label = row["label"] if not abstain else f"{t['not_reported']} ({abstain}; {row['label']})"
    for caption, value in (
        (t["label"], label),
        (t["risk"], row["risk"]),
        (t["malignant"], f"{100 * (row['malignant_probability'] or 0):.1f}%"),
    ):
        doc.set_x(right)
        doc.set_font("dejavu", "B", 10)
        doc.cell(48, 6, f"{caption}:")
        doc.set_font("dejavu", "", 10)
        if caption == t["risk"]:
            doc.set_text_color(*RISK_RGB.get(row["risk"], (0, 0, 0)))
        doc.multi_cell(0, 6, str(value), align="L", new_x="LMARGIN", new_y="NEXT")  # wraps within the page
        doc.set_text_color(0, 0, 0)
        doc.set_x(right)
    doc.set_y(max(doc.get_y(), top_y + image_h) + 4)


def _lesions(page: _Page, lesions: list[dict[str, Any]]) -> None:
    """Each lesion: where it is, its risk, its probabilities as bars."""
    doc, t = page.doc, page.t
    for n, les in enumerate(lesions, 1):
        where = (
            f"box {', '.join(f'{v:.2f}' for v in les['box'])}, detector {100 * les['detector_confidence']:.0f}%"
            if les.get("box")
            else t["whole"]
        )
        page.heading(f"{t['lesion']} {n}: {les['label']}  ({where})", 11)
        page.line(t["risk"], f"{les['risk']}  ({t['malignant']} {100 * les['malignant_probability']:.1f}%)")
        doc.cell(0, 6, f"{t['probabilities']}:", new_x="LMARGIN", new_y="NEXT")
        for cls, p in sorted(les["probabilities"].items(), key=lambda kv: -kv[1]):
            y = doc.get_y()
            doc.set_x(doc.l_margin + 4)
            doc.cell(18, 5, cls)
            doc.set_fill_color(230, 233, 240)
            doc.rect(doc.l_margin + 24, y + 1, 100, 3, style="F")
            doc.set_fill_color(58, 103, 216)
            doc.rect(doc.l_margin + 24, y + 1, max(0.3, 100 * p), 3, style="F")
            doc.set_x(doc.l_margin + 128)
            doc.cell(0, 5, f"{100 * p:.1f}%", align="L", new_x="LMARGIN", new_y="NEXT")
        doc.ln(2)


def _closing(page: _Page, row: dict[str, Any], guidance: dict[str, Any], warnings: list[str], disclaimer: str):
    """Quality, guidance with its sources, the model versions and the disclaimer."""
    doc, t = page.doc, page.t
    page.heading(t["quality"], 11)
    q = row.get("quality") or {}
    summary = ", ".join(f"{k} {v:.3g}" for k, v in q.items() if isinstance(v, int | float))
    doc.multi_cell(
        0, 5, "; ".join(warnings) if warnings else f"{t['quality_ok']} ({summary})", new_x="LMARGIN", new_y="NEXT"
    )
    doc.ln(2)
    page.heading(t["guidance"], 11)
    page.text(guidance.get("text") or guidance.get("note") or "")
    if guidance.get("source"):
        doc.set_font("dejavu", "", 8)
        page.text(guidance["source"], 4)
        for ref in guidance.get("references") or []:
            page.text(f"- {ref}", 4)
        if guidance.get("review"):
            page.text(str(guidance["review"]), 4)
    doc.ln(2)
    page.heading(t["models"], 11)
    page.text(f"{row['classifier_version']}, {row['detector_version']}")
    doc.ln(3)
    doc.set_font("dejavu", "", 8)
    doc.set_text_color(90, 100, 120)
    page.text(disclaimer, 4)


def pdf(
    row: dict[str, Any],
    *,
    language: str,
    guidance: dict[str, Any],
    abstain: str | None,
    warnings: list[str],
    disclaimer: str,
    photo: bytes | None,
    photo_note: str | None = None,
    patient: dict[str, str] | None = None,
) -> bytes:
    """The PDF report of one logged prediction (``row`` as the prediction log holds it)."""
    page = _Page(language, row["request_id"])
    _head(page, row, patient)
    _photo_and_result(page, row, abstain, photo, photo_note)
    _lesions(page, row["lesions"])
    _closing(page, row, guidance, warnings, disclaimer)
    return bytes(page.doc.output())


def csv_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    """A CSV that Excel opens with the right characters: UTF-8 with a byte-order mark, CRLF rows."""
    import csv

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8-sig")
