"""The report routes: the PDF of one logged prediction and the CSV of a batch, one row per lesion.

Patient data is behind the reviewer key: a report shows the stored photo and the patient fields kept with consent
only to a caller with the key, and only a caller with the key stores (or replaces) a patient's identity. Without
it, a report carries the result alone (and the fields the caller sent in that same request, printed, not kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from bentoml import get_current_service
from fastapi import APIRouter, Depends, Request

from components.model.model_card import DISCLAIMER
from components.monitoring.quality import reported
from serving.app import MAX_CSV_IDS, REQUESTS, S, has_reviewer_key, json_object, options, require_reviewer
from serving.inputs import InputError

router = APIRouter()


def _logged_row(svc: Any, request_id: str) -> dict[str, Any]:
    row = svc.log.get(request_id)
    if row is None:
        raise InputError(404, "unknown request_id", f"no prediction {request_id!r} is logged", "unknown")
    return row


def _pdf(svc: Any, row: dict[str, Any], language: str, patient: dict[str, str] | None, photo_ok: bool) -> bytes:
    from serving.inputs import assess
    from serving.patient_report import pdf
    from serving.pipeline import guidance

    p = svc.pipeline
    photo, note = None, None
    if not photo_ok:
        note = "shown only with the reviewer key (X-API-Key): the photo is patient data"
    elif row["image_path"] and Path(row["image_path"]).is_file():
        photo = Path(row["image_path"]).read_bytes()
    else:  # .get: this runs in a worker thread while the event loop may evict the photo
        photo = svc.photos.get(row["request_id"])
    if photo is None and note is None:
        note = (
            "not stored (serving.store_images is off) and no longer among the "
            f"{S.report_photos} recent photos kept in memory"
        )
    top = reported({"lesions": row["lesions"]})
    held = p.abstention(row["lesions"], top)
    return pdf(
        row,
        language=language,
        guidance=guidance(row["label"], row["risk"], language, row["fallback"]),
        abstain=held["abstain"],
        warnings=assess(row["quality"], row["width"], row["height"], p.serving),
        disclaimer=DISCLAIMER,
        photo=photo,
        photo_note=note,
        patient=patient,
    )


async def _report(request: Request, svc: Any, request_id: str, language: str | None, patient: Any, consent: Any):
    from fastapi.responses import Response

    from serving.patient_report import ReportError, check_patient

    lang = options("none", "false", language)[2]
    if consent not in (None, True, False):
        raise InputError(422, "invalid consent", f"consent={consent!r}; use true or false", "options")
    try:
        fields = check_patient(patient)
    except ReportError as e:
        raise InputError(422, "invalid patient fields", str(e), "patient") from e
    reviewer = has_reviewer_key(request)
    if fields and consent:  # storing (or replacing) a patient's identity is a reviewer's act
        require_reviewer(request, "storing patient fields")
    row = await anyio.to_thread.run_sync(_logged_row, svc, request_id)
    if fields and consent:
        await anyio.to_thread.run_sync(svc.log.keep_patient, request_id, fields)
    elif not fields and reviewer:  # a reviewer's GET shows what was kept with consent, if anything
        fields = await anyio.to_thread.run_sync(svc.log.patient, request_id) or {}
    body = await anyio.to_thread.run_sync(_pdf, svc, row, lang, fields, reviewer)
    REQUESTS.labels(endpoint="/report", status="200").inc()
    return Response(
        body,
        media_type="application/pdf",
        headers={
            "Content-Disposition": f'inline; filename="drspot-{request_id}.pdf"',
            "Cache-Control": "no-store",
        },
    )


async def _batch_csv(svc: Any, ids: Any, language: str | None):
    from fastapi.responses import Response

    from serving.batch import lesion_rows, table_columns
    from serving.inputs import assess
    from serving.patient_report import csv_bytes, utc

    lang = options("none", "false", language)[2]
    if isinstance(ids, str):
        ids = [i.strip() for i in ids.split(",") if i.strip()]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise InputError(422, "invalid request_ids", "send the request ids of the batch as a list", "options")
    if len(ids) > MAX_CSV_IDS:
        raise InputError(422, "too many request_ids", f"{len(ids)} ids; at most {MAX_CSV_IDS}", "options")
    found = await anyio.to_thread.run_sync(svc.log.rows, ids)
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise InputError(404, "unknown request_id", f"not logged: {', '.join(unknown[:10])}", "unknown")
    p = svc.pipeline
    columns = ["request_id", "created_at", *(c for c in table_columns(list(p.classes)) if c != "source")]
    rows = []
    for i in ids:
        r = found[i]
        warnings = assess(r["quality"], r["width"], r["height"], p.serving)
        image = {
            "request_id": i,
            "created_at": utc(r["created_at"]).isoformat(),
            "image_sha256": r["image_sha256"],
            "width": r["width"],
            "height": r["height"],
            "format": r["format"],
            "quality_ok": not warnings,
            "quality_warnings": "; ".join(warnings) or None,
            "fallback": r["fallback"],
            "fallback_reason": r["fallback_reason"],
            "classifier_version": r["classifier_version"],
            "detector_version": r["detector_version"],
        }
        rows += lesion_rows(image, r, p, lang)
    REQUESTS.labels(endpoint="/report/batch.csv", status="200").inc()
    return Response(
        csv_bytes(rows, columns),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="drspot-batch.csv"', "Cache-Control": "no-store"},
    )


@router.get("/report/batch.csv")
async def report_csv(ids: str = "", language: str | None = None, svc: Any = Depends(get_current_service)):
    """The CSV of a batch of logged predictions (``ids``: comma-separated request ids), one row per lesion, UTF-8
    with a BOM (Excel opens it with the right characters)."""
    return await _batch_csv(svc, ids, language)


@router.post("/report/batch.csv")
async def report_csv_post(request: Request, svc: Any = Depends(get_current_service)):
    """As GET, for long batches: ``{"request_ids": [...], "language": ...}``."""
    spec = await json_object(request)
    return await _batch_csv(svc, spec.get("request_ids"), spec.get("language"))


@router.get("/report/{request_id}.pdf")
async def report_pdf(
    request: Request, request_id: str, language: str | None = None, svc: Any = Depends(get_current_service)
):
    """The PDF report of a logged prediction; with the reviewer key, also the photo and the patient fields kept
    under consent."""
    return await _report(request, svc, request_id, language, None, None)


@router.post("/report/{request_id}.pdf")
async def report_pdf_post(request: Request, request_id: str, svc: Any = Depends(get_current_service)):
    """The PDF report with patient fields: ``{"patient": {"name", "patient_id", "birth_date", "sex", "notes"},
    "consent": false, "language": ...}``. The fields are printed; they are stored (and shown in later reports of
    this request to a reviewer) only with ``"consent": true`` and the reviewer key."""
    spec = await json_object(request)
    return await _report(request, svc, request_id, spec.get("language"), spec.get("patient"), spec.get("consent"))
