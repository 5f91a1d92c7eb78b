"""The clinicians' routes, behind the reviewer key: ``/feedback`` (a confirmed label), ``/review`` (the queue) and
a logged photo for the reviewer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import anyio
from bentoml import get_current_service
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.app import CFG, REQUESTS, idempotency_key, json_object, require_reviewer
from serving.inputs import InputError

router = APIRouter()


def lesion_box(value: Any) -> list[float] | None:
    """A reviewer's lesion box: [x_min, y_min, x_max, y_max] normalised to the photo, inside it, min < max."""
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 4 and all(isinstance(v, int | float) for v in value)
    if not ok:
        raise InputError(422, "invalid box", f"box={value!r}; send [x_min, y_min, x_max, y_max] in 0..1", "box")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(
            422,
            "box outside the image",
            f"box={value!r}: coordinates are fractions of the photo (0..1) with x_min < x_max and y_min < y_max",
            "box",
        )
    return [round(v, 6) for v in (x0, y0, x1, y1)]


@router.post("/feedback")
async def feedback(request: Request, svc: Any = Depends(get_current_service)):
    """A clinician-confirmed label for a logged prediction. Needs the API key (X-API-Key)."""
    require_reviewer(request, "feedback")
    key = idempotency_key(request)
    spec = await json_object(request, "invalid feedback")
    missing = [k for k in ("request_id", "confirmed_label", "reviewer") if not str(spec.get(k) or "").strip()]
    if missing:
        raise InputError(422, "invalid feedback", f"missing or empty: {', '.join(missing)}", "invalid")
    label = str(spec["confirmed_label"]).strip()
    if label not in CFG.classes.names:
        raise InputError(
            422,
            "unknown label",
            f"{label!r} is not one of {', '.join(CFG.classes.names)}",
            "label",
        )
    box = lesion_box(spec.get("box"))
    prediction = await anyio.to_thread.run_sync(svc.log.get, str(spec["request_id"]))
    if prediction is None:
        raise InputError(404, "unknown request_id", f"no prediction {spec['request_id']!r} is logged", "unknown")
    reviewer = str(spec["reviewer"]).strip()[:200]
    fid, replayed = await anyio.to_thread.run_sync(
        svc.log.add_feedback, prediction["request_id"], label, reviewer, box, key
    )
    status = 200 if replayed else 201  # sent again with its Idempotency-Key: recorded once, answered as before
    REQUESTS.labels(endpoint="/feedback", status=str(status)).inc()
    stored = prediction["image_path"] is not None
    return JSONResponse(
        {
            "feedback_id": fid,
            "request_id": prediction["request_id"],
            "confirmed_label": label,
            "predicted_label": prediction["label"],
            "box": box,
            "image_stored": stored,
            "usable_for_retraining": stored,
            **({} if stored else {"note": "the image was not stored (serving.store_images is off)"}),
            **({"replayed": True} if replayed else {}),
        },
        status_code=status,
    )


@router.get("/review")
async def review(request: Request, limit: int = 20, since: str | None = None, svc: Any = Depends(get_current_service)):
    """The review queue: unconfirmed predictions with a stored photo (logged at or after ``since``, an ISO 8601 time,
    when given: this week's cases, a new clinic's), ranked by what a confirmation would teach the model
    (components/monitoring/review.py). Needs a reviewer key (X-API-Key)."""
    from components.monitoring.review import rank

    require_reviewer(request, "review")
    if not 1 <= limit <= 200:
        raise InputError(422, "invalid limit", f"limit={limit}; use 1 to 200", "options")
    start = None
    if since is not None:
        try:
            start = dt.datetime.fromisoformat(since)
        except ValueError:
            raise InputError(422, "invalid since", f"since={since[:64]!r} is not an ISO 8601 time", "options") from None
        start = start if start.tzinfo else start.replace(tzinfo=dt.UTC)
    pool = max(limit * 10, CFG.monitor.review.pool)
    rows, blind = await anyio.to_thread.run_sync(svc.log.unconfirmed, pool, start)
    p = svc.pipeline
    q = CFG.monitor.review
    # off the event loop: spreading over clusters fits a PCA and k-means on up to monitor.review.pool embeddings
    items = await anyio.to_thread.run_sync(rank, rows, p.threshold, p.ood_threshold, limit, q.random_share, q.spread)
    REQUESTS.labels(endpoint="/review", status="200").inc()
    return JSONResponse(
        {"items": items, "classes": list(CFG.classes.names), "considered": len(rows), "unreviewable": blind}
    )


@router.get("/review/{request_id}/image")
async def review_image(request: Request, request_id: str, svc: Any = Depends(get_current_service)):
    """The stored photo of a logged prediction, for the reviewer (X-API-Key)."""
    from fastapi.responses import FileResponse

    require_reviewer(request, "review")
    row = await anyio.to_thread.run_sync(svc.log.get, request_id)
    if row is None:
        raise InputError(404, "unknown request_id", f"no prediction {request_id!r} is logged", "unknown")
    if not row["image_path"] or not Path(row["image_path"]).is_file():
        raise InputError(
            404,
            "no stored photo",
            f"the photo of {request_id} was not stored (serving.store_images)",
            "unknown",
        )
    return FileResponse(row["image_path"], headers={"Cache-Control": "no-store"})
