"""The DrSpot BentoML service: the two-stage endpoint, its operations endpoints and the web page.

Run with ``drspot serve`` (the Bento built by ``drspot deploy``) or, from a checkout,
``bentoml serve serving.service:DrSpot``. The models are the registry's champions as copied into
the Bento model store by ``drspot deploy`` (tags ``drspot-classifier`` / ``drspot-detector``).

Public endpoints are a FastAPI app mounted on the service, so every refusal is a 4xx with the
contract's ``{"error", "detail"}`` body; the model stage is the BentoML API ``/infer``, batchable,
so concurrent requests are merged by BentoML's adaptive batching (``serving.batching``).
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import anyio
import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

import components  # noqa: F401  (offline settings first)
from components.config import load_config
from components.env import check_home
from components.evaluate import DISCLAIMER
from components.quality import reported
from serving.inputs import InputError, body_limit, check_length, from_base64, read_image
from serving.pipeline import PREPROCESS, KnowledgeError, Pipeline, correct, resolve_language

# the configuration `drspot serve` resolved ($DRSPOT_CONFIG) and the state home it handed over ($DRSPOT_HOME):
# a service whose log would land inside its own Bento refuses to start here, naming the setting to give
CFG = load_config()
HOME = check_home(CFG.home)
S = CFG.serving
# the model tags: pinned by `drspot deploy` as Bento build arguments; else the newest in the store
_ARGS = bentoml.use_arguments()
CLASSIFIER_TAG = getattr(_ARGS, "classifier", None) or os.environ.get(
    "DRSPOT_CLASSIFIER_TAG", "drspot-classifier:latest"
)
DETECTOR_TAG = getattr(_ARGS, "detector", None) or os.environ.get("DRSPOT_DETECTOR_TAG", "drspot-detector:latest")
PAGE = Path(__file__).parent / "static" / "index.html"
REVIEW_PAGE = Path(__file__).parent / "static" / "review.html"

REQUESTS = bentoml.metrics.Counter(
    name="drspot_requests_total", documentation="requests by endpoint and status", labelnames=["endpoint", "status"]
)
LATENCY = bentoml.metrics.Histogram(
    name="drspot_request_latency_seconds",
    documentation="end-to-end latency of /predict",
    labelnames=["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FALLBACKS = bentoml.metrics.Counter(
    name="drspot_fallbacks_total", documentation="whole-image fallbacks by reason", labelnames=["reason"]
)
ABSTENTIONS = bentoml.metrics.Counter(
    name="drspot_abstentions_total",
    documentation="answers that held back the class, by kind (uncertain, not_dermoscopic_lesion)",
    labelnames=["kind"],
)
REJECTIONS = bentoml.metrics.Counter(
    name="drspot_rejections_total", documentation="refused requests by reason", labelnames=["reason"]
)

# what /readyz reports (set once the models are loaded, in the worker process)
READY: dict[str, Any] = {}
PHOTO_BUDGET = 128 * 1048576  # the in-memory photos for reports never hold more than this
MAX_CSV_IDS = 1000  # request ids in one batch CSV
# streamed predictions still running (a reference keeps each task alive to its end)
_RUNNING: set[Any] = set()

app = FastAPI(title="DrSpot", description="Two-stage skin-lesion analysis (decision support, not a diagnosis)")


def _error(e: InputError, endpoint: str) -> JSONResponse:
    REJECTIONS.labels(reason=e.reason).inc()
    REQUESTS.labels(endpoint=endpoint, status=str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors())
    return _error(InputError(422, "invalid request", detail, "invalid_request"), request.url.path)


async def _read_body(request: Request) -> bytes:
    """The body, refusing one over the limit before reading it (Content-Length) or while reading it."""
    check_length(request.headers.get("content-length"), S)
    limit, chunks, size = body_limit(S), [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(
                413, "request body too large", f"more than {S.max_body_mb:g} MB was sent", "body_too_large"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's form parser reads the cached body
    return body


async def _multipart_image(request: Request, alternative: str) -> bytes:
    """The photo in a multipart body's field ``image``, or the 4xx that says what was sent instead."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise InputError(
            415,
            "wrong content type",
            f"got {ctype or 'no content type'}; send multipart/form-data with the photo in field 'image' "
            f"({alternative})",
            "content_type",
        )
    await _read_body(request)
    try:
        form = await request.form(max_part_size=int(S.max_body_mb * 1048576))
    except Exception as e:
        raise InputError(400, "malformed multipart body", str(e) or type(e).__name__, "multipart") from e
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        fields = ", ".join(form.keys()) or "none"
        raise InputError(
            422, "missing field 'image'", f"the form has no file in field 'image' (fields: {fields})", "missing"
        )
    return await upload.read()


async def _json_object(request: Request) -> dict[str, Any]:
    """A JSON object body, or the 4xx that says what was wrong with it."""
    body = await _read_body(request)
    try:
        spec = json.loads(body)
    except ValueError as e:
        raise InputError(400, "malformed JSON", str(e), "json") from e
    if not isinstance(spec, dict):
        raise InputError(422, "invalid request", "send a JSON object", "invalid")
    return spec


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON prediction request: an object with the photo as base64 in ``image``."""
    spec = await _json_object(request)
    if not isinstance(spec.get("image"), str):
        raise InputError(422, "missing field 'image'", 'send {"image": "<base64>"}', "missing")
    return spec


def _reviewer(request: Request, what: str) -> None:
    """A reviewer's key in ``X-API-Key`` (or ``Authorization: Bearer``), or a 401 / 503 that says what is missing."""
    import hmac

    key = os.environ.get(S.feedback_key_env)
    if not key:
        raise InputError(503, f"{what} disabled", f"no reviewer key is configured: set {S.feedback_key_env}", "no_key")
    given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
    if not given or not hmac.compare_digest(given, key):
        raise InputError(401, "unauthorised", "a valid reviewer key in the X-API-Key header is required", "auth")


def _box(value: Any) -> list[float] | None:
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


def _options(preprocess: str, compare: Any, language: str | None) -> tuple[str, bool, str]:
    if preprocess not in PREPROCESS:
        raise InputError(
            422, "invalid preprocess", f"preprocess={preprocess!r}; use one of {', '.join(PREPROCESS)}", "options"
        )
    flag = str(compare).lower()
    if flag not in ("true", "false", "1", "0", "none"):
        raise InputError(422, "invalid compare", f"compare={compare!r}; use true or false", "options")
    try:
        lang = resolve_language(language, S.language)
    except KnowledgeError as e:
        raise InputError(422, "invalid language", str(e), "options") from e
    return preprocess, flag in ("true", "1"), lang


class _ReadyzWithVersions:
    """BentoML's /readyz says only "ready"; DrSpot's also names the models it serves."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz" and scope["method"] == "GET":
            ready = bool(READY)
            body = json.dumps({"ready": ready, **READY} if ready else {"ready": False, "detail": "models loading"})
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if ready else 503,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self.app(scope, receive, send)


# serving.workers API processes (they share one socket); overridable without code by
# BENTOML_CONFIG_OPTIONS="services.drspot.workers=2"
@bentoml.service(name="drspot", traffic={"timeout": 120}, workers=S.workers)
@bentoml.asgi_app(app, path="/")
class DrSpot:
    classifier_model = bentoml.models.BentoModel(CLASSIFIER_TAG)
    detector_model = bentoml.models.BentoModel(DETECTOR_TAG)

    def __init__(self) -> None:
        from serving.store import PredictionLog, check_log, describe

        check_log(CFG)
        cm, dm = self.classifier_model, self.detector_model
        self.versions = {
            "classifier": cm.info.metadata.get("registry", str(cm.tag)),
            "detector": dm.info.metadata.get("registry", str(dm.tag)),
        }
        self.pipeline = Pipeline(Path(cm.path), Path(dm.path), CFG, self.versions)
        self.log = PredictionLog.from_config(CFG)
        # the last serving.report_photos photos, in memory only, for their /report PDFs (on disk: store_images)
        self.photos: OrderedDict[str, bytes] = OrderedDict()
        self.started = time.time()
        READY.update(
            {
                "models": self.versions,
                "bento_models": {"classifier": str(cm.tag), "detector": str(dm.tag)},
                "data_version": cm.info.metadata.get("data_version"),
                "detector_loaded": self.pipeline.detector is not None,
                "detector_error": self.pipeline.detector_error,
                "batching": S.batching,
                "runtime": S.runtime,
                "stability": S.stability.model_dump(),
                "quality_limits": {
                    "source": self.pipeline.quality_source,
                    **{k: getattr(self.pipeline.serving, k) for k in ("blur_min", "brightness_min", "brightness_max")},
                },
                "ood": {"source": self.pipeline.ood_source, "threshold": self.pipeline.ood_threshold},
                "profile": CFG.profile,
                "config_digest": CFG.digest(),
                "state_home": str(HOME),
                "prediction_log": describe(CFG),
                "images_dir": str(CFG.resolve(S.images_dir)) if S.store_images else None,
            }
        )

    @bentoml.api(batchable=True, max_batch_size=S.max_batch_size, max_latency_ms=S.max_latency_ms)
    def infer(self, items: list[str]) -> list[str]:
        """The model stage over a batch: items are JSON ``{"image": base64, "preprocess": ...}``."""
        from components.images import decode

        images = []
        for item in items:
            spec = json.loads(item)
            images.append(correct(decode(base64.b64decode(spec["image"])).rgb, spec.get("preprocess", "none")))
        return [json.dumps(r) for r in self.pipeline.analyse_many(images)]

    async def _analyse(self, data: bytes, rgb, variants: list[str]) -> list[dict[str, Any]]:
        if S.batching:
            import aiohttp

            b64 = base64.b64encode(data).decode()
            items = [json.dumps({"image": b64, "preprocess": v}) for v in variants]
            for attempt in range(3):
                try:
                    out = await self.to_async.infer(items)
                    break
                except aiohttp.ClientConnectionError:
                    # the service's own client reused a keep-alive connection the server was closing (idle
                    # timeout): seen as ServerDisconnectedError, and under load as ClientOSError / "Cannot write to
                    # closing transport" (a 500 in the demo's shifted traffic); inference is idempotent, so a retry
                    # on a fresh connection is safe
                    if attempt == 2:
                        raise
            return [json.loads(o) for o in out]
        # the corrections too run off the event loop (colour constancy and CLAHE are whole-photo numpy work)
        return await anyio.to_thread.run_sync(lambda: self.pipeline.analyse_many([correct(rgb, v) for v in variants]))

    async def _predict(self, data: bytes, preprocess: str, compare: bool, language: str, endpoint: str):
        t0 = time.perf_counter()
        up = await anyio.to_thread.run_sync(read_image, data, self.pipeline.serving)
        t_decode = time.perf_counter() - t0
        # compare: the original beside the corrected photo (colour constancy when none was asked for)
        corrected = preprocess if preprocess != "none" else "color_constancy"
        variants = ["none", corrected] if compare else [preprocess]
        results = await self._analyse(data, up.rgb, variants)
        extra = self.pipeline.answer(results[-1], language)
        response = await self._respond(up, variants, results, extra, uuid.uuid4().hex, endpoint, t0, t_decode)
        return JSONResponse(response)

    @staticmethod
    def _image_part(up) -> dict[str, Any]:
        w, h = up.rgb.size
        return {
            "sha256": up.sha256,
            "width": w,
            "height": h,
            "format": up.format,
            "quality": {
                "ok": not up.warnings,
                "warnings": up.warnings,
                **{k: round(v, 4) for k, v in up.quality.items()},
            },
            "notes": up.decoded.notes,
        }

    async def _respond(
        self,
        up,
        variants: list[str],
        results: list[dict[str, Any]],
        extra: dict[str, Any],
        request_id: str,
        endpoint: str,
        t0: float,
        t_decode: float,
    ) -> dict[str, Any]:
        """The answer to a prediction (the last variant's result is the answer), logged before it is returned."""
        main, compare = results[-1], len(variants) > 1
        extra = dict(extra)
        w, h = up.rgb.size
        response = {
            "request_id": request_id,
            # read before any class: the answer may hold the class back (the probabilities stay below)
            "abstain": extra.pop("abstain"),
            "abstain_reason": extra.pop("abstain_reason"),
            "ood_score": extra.pop("ood_score"),
            "image": self._image_part(up),
            "lesions": main["lesions"],
            "fallback": main["fallback"],
            "fallback_reason": main["fallback_reason"],
            "preprocess": variants[-1],
            "models": dict(self.versions),
            **extra,
        }
        if compare:
            response["comparison"] = {
                v: {k: r[k] for k in ("lesions", "fallback", "fallback_reason")}
                for v, r in zip(variants, results, strict=True)
            }
        image_path = await anyio.to_thread.run_sync(self._store, up) if S.store_images else None
        top = reported(main)
        row = {
            "request_id": request_id,
            "image_sha256": up.sha256,
            "width": w,
            "height": h,
            "format": up.format,
            "quality": up.quality,
            "embedding": main["embedding"],
            "lesions": main["lesions"],
            "label": top["label"],
            "confidence": max(top["probabilities"].values()),
            "malignant_probability": top["malignant_probability"],
            "risk": top["risk"],
            "fallback": main["fallback"],
            "fallback_reason": main["fallback_reason"],
            "preprocess": variants[-1],
            "classifier_version": self.versions["classifier"],
            "detector_version": self.versions["detector"],
            "image_path": image_path,
            "variants": {v: reported(r)["label"] for v, r in zip(variants, results, strict=True)} if compare else None,
        }
        await anyio.to_thread.run_sync(self.log.record, row)
        if image_path is None and S.report_photos:
            self._keep_photo(request_id, up.data)
        response["image"]["stored"] = image_path is not None
        total = time.perf_counter() - t0
        response["timings_ms"] = {
            "decode": round(t_decode * 1000, 2),
            **main["timings_ms"],
            "total": round(total * 1000, 2),
        }
        if response["abstain"]:
            ABSTENTIONS.labels(kind=response["abstain"]).inc()
        if main["fallback"]:
            reason = "detector_error" if (main["fallback_reason"] or "").startswith("detector") else "no_lesion"
            FALLBACKS.labels(reason=reason).inc()
        LATENCY.labels(endpoint=endpoint).observe(total)
        REQUESTS.labels(endpoint=endpoint, status="200").inc()
        return response

    async def _stages(self, up, preprocess: str, language: str, t0: float, t_decode: float, events) -> None:
        """One prediction stage by stage, each stage's event put on ``events`` the moment it is known: quality,
        detection, one classification per lesion, guidance, then done with the whole answer (the same as /predict's,
        logged the same way). Runs to the end and logs even when the client has gone."""
        endpoint = "/predict/stream"
        try:
            request_id = uuid.uuid4().hex
            await events.put(("quality", {"request_id": request_id, "image": self._image_part(up)}))
            img = await anyio.to_thread.run_sync(correct, up.rgb, preprocess)
            t1 = time.perf_counter()
            [(plan, err)] = await anyio.to_thread.run_sync(self.pipeline.locate, [img])
            t2 = time.perf_counter()
            found = [{"box": b, "detector_confidence": c} for b, c in plan] if err is None else []
            await events.put(("detection", {"boxes": found, "fallback": err is not None, "fallback_reason": err}))
            lesions: list[dict[str, Any]] = []
            embedding = None
            for i, pair in enumerate(plan):
                [(one, emb)] = await anyio.to_thread.run_sync(self.pipeline.lesions, [img], [([pair], err)])
                lesions += one
                embedding = embedding or emb
                await events.put(("classification", {"index": i, "of": len(plan), **one[0]}))
            t3 = time.perf_counter()
            main = Pipeline.result(
                lesions,
                embedding,
                err,
                {"detector": round((t2 - t1) * 1000, 2), "classifier": round((t3 - t2) * 1000, 2)},
            )
            extra = self.pipeline.answer(main, language)
            await events.put(
                ("guidance", {k: extra[k] for k in ("abstain", "abstain_reason", "guidance", "disclaimer")})
            )
            response = await self._respond(up, [preprocess], [main], extra, request_id, endpoint, t0, t_decode)
            await events.put(("done", response))
        except Exception as e:  # after the first event the status is sent: the failure is the last event
            REQUESTS.labels(endpoint=endpoint, status="500").inc()
            await events.put(("error", {"error": "analysis failed", "detail": f"{type(e).__name__}: {e}"}))

    def _keep_photo(self, request_id: str, data: bytes) -> None:
        self.photos[request_id] = data
        while len(self.photos) > S.report_photos or sum(map(len, self.photos.values())) > PHOTO_BUDGET:
            self.photos.popitem(last=False)

    def _report_row(self, request_id: str) -> dict[str, Any]:
        row = self.log.get(request_id)
        if row is None:
            raise InputError(404, "unknown request_id", f"no prediction {request_id!r} is logged", "unknown")
        return row

    def _pdf(self, row: dict[str, Any], language: str, patient: dict[str, str] | None) -> bytes:
        from serving.inputs import assess
        from serving.pipeline import guidance
        from serving.report import pdf

        p = self.pipeline
        photo, note = None, None
        if row["image_path"] and Path(row["image_path"]).is_file():
            photo = Path(row["image_path"]).read_bytes()
        else:  # .get: this runs in a worker thread while the event loop may evict the photo
            photo = self.photos.get(row["request_id"])
        if photo is None:
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

    async def _report(self, request_id: str, language: str | None, patient: Any, consent: Any):
        from fastapi.responses import Response

        from serving.report import ReportError, check_patient

        lang = _options("none", "false", language)[2]
        if consent not in (None, True, False):
            raise InputError(422, "invalid consent", f"consent={consent!r}; use true or false", "options")
        try:
            fields = check_patient(patient)
        except ReportError as e:
            raise InputError(422, "invalid patient fields", str(e), "patient") from e
        row = await anyio.to_thread.run_sync(self._report_row, request_id)
        if fields and consent:
            await anyio.to_thread.run_sync(self.log.keep_patient, request_id, fields)
        elif not fields:  # a plain GET shows what was kept with consent, if anything
            fields = await anyio.to_thread.run_sync(self.log.patient, request_id) or {}
        body = await anyio.to_thread.run_sync(self._pdf, row, lang, fields)
        REQUESTS.labels(endpoint="/report", status="200").inc()
        return Response(
            body,
            media_type="application/pdf",
            headers={
                "Content-Disposition": f'inline; filename="drspot-{request_id}.pdf"',
                "Cache-Control": "no-store",
            },
        )

    async def _batch_csv(self, ids: Any, language: str | None):
        from fastapi.responses import Response

        from serving.batch import lesion_rows, table_columns
        from serving.inputs import assess
        from serving.report import csv_bytes, utc

        lang = _options("none", "false", language)[2]
        if isinstance(ids, str):
            ids = [i.strip() for i in ids.split(",") if i.strip()]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise InputError(422, "invalid request_ids", "send the request ids of the batch as a list", "options")
        if len(ids) > MAX_CSV_IDS:
            raise InputError(422, "too many request_ids", f"{len(ids)} ids; at most {MAX_CSV_IDS}", "options")
        found = await anyio.to_thread.run_sync(self.log.rows, ids)
        unknown = [i for i in ids if i not in found]
        if unknown:
            raise InputError(404, "unknown request_id", f"not logged: {', '.join(unknown[:10])}", "unknown")
        p = self.pipeline
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

    def _store(self, up) -> str:
        return self.log.store_image(up.sha256, up.data, up.format)

    @app.post("/predict")
    async def predict(
        self,
        request: Request,
        preprocess: str = "none",
        compare: str = "false",
        language: str | None = None,
    ):
        """Multipart upload, field ``image``. Query: preprocess, compare, language."""
        try:
            opts = _options(preprocess, compare, language)
            data = await _multipart_image(request, "or JSON to /predict/json")
            return await self._predict(data, *opts, endpoint="/predict")
        except InputError as e:
            return _error(e, "/predict")

    @app.post("/predict/stream")
    async def predict_stream(self, request: Request, preprocess: str = "none", language: str | None = None):
        """The answer as Server-Sent Events, each as soon as it is known: ``quality``, ``detection``, one
        ``classification`` per lesion, ``guidance``, ``done`` (the whole answer, as /predict's) or ``error``. The
        photo as /predict takes it (multipart field ``image``) or as JSON ``{"image": base64, "preprocess",
        "language"}``. A refused request is a plain 4xx JSON answer, before any event."""
        import asyncio

        from fastapi.responses import StreamingResponse

        try:
            if request.headers.get("content-type", "").startswith("application/json"):
                spec = await _json_body(request)
                preprocess, language = spec.get("preprocess", preprocess), spec.get("language", language)
                opts = _options(preprocess, "false", language)
                data = from_base64(spec["image"])
            else:
                opts = _options(preprocess, "false", language)
                data = await _multipart_image(request, 'or JSON {"image": "<base64>"}')
            t0 = time.perf_counter()
            up = await anyio.to_thread.run_sync(read_image, data, self.pipeline.serving)
            t_decode = time.perf_counter() - t0
        except InputError as e:
            return _error(e, "/predict/stream")
        events: asyncio.Queue = asyncio.Queue()
        # its own task: a client that goes away mid-stream does not cancel the analysis or its log entry
        task = asyncio.create_task(self._stages(up, opts[0], opts[2], t0, t_decode, events))
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)

        async def sse():
            while True:
                name, payload = await events.get()
                yield f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                if name in ("done", "error"):
                    return

        return StreamingResponse(
            sse(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    @app.post("/predict/frames")
    async def predict_frames(self, request: Request):
        """Frames of one lesion in time order (a camera): ``{"frames": [{"image": base64, "t": seconds}, ...],
        "preprocess", "language"}``. A class is confirmed only when it holds as ``serving.stability`` says
        (serving/stability.py); then the last frame of the run is answered and logged as /predict's photo is
        (``answer``, ``request_id``). Every frame's reading comes back either way, with the reason."""
        from serving.stability import Reading, window

        try:
            spec = await _json_object(request)
            frames, st = spec.get("frames"), S.stability
            if not isinstance(frames, list) or not frames:
                raise InputError(
                    422, "missing frames", 'send {"frames": [{"image": "<base64>", "t": 0.0}, ...]}', "missing"
                )
            if len(frames) > st.max_frames:
                raise InputError(
                    422, "too many frames", f"{len(frames)} frames; at most {st.max_frames} in one request", "frames"
                )
            times = []
            for i, f in enumerate(frames):
                ok = isinstance(f, dict) and isinstance(f.get("image"), str)
                if not ok or not isinstance(f.get("t"), int | float) or isinstance(f.get("t"), bool):
                    raise InputError(
                        422, "invalid frame", f'frame {i}: send {{"image": "<base64>", "t": <seconds>}}', "frames"
                    )
                if times and f["t"] <= times[-1]:
                    raise InputError(
                        422,
                        "frames out of order",
                        f"frame {i} (t={f['t']:g}) is not after frame {i - 1} (t={times[-1]:g}): send frames in order",
                        "frames",
                    )
                times.append(float(f["t"]))
            preprocess, _, language = _options(spec.get("preprocess", "none"), "false", spec.get("language"))
            t0 = time.perf_counter()
            ups = []
            for i, f in enumerate(frames):
                try:
                    ups.append(
                        await anyio.to_thread.run_sync(read_image, from_base64(f["image"]), self.pipeline.serving)
                    )
                except InputError as e:
                    raise InputError(e.status, e.error, f"frame {i}: {e.detail}", e.reason) from e
                if ups[-1].rgb.size != ups[0].rgb.size:
                    (w0, h0), (w, h) = ups[0].rgb.size, ups[-1].rgb.size
                    raise InputError(
                        422,
                        "frames differ in size",
                        f"frame {i} is {w}x{h}, frame 0 is {w0}x{h0}: the frames of one sequence come from one camera",
                        "frames",
                    )
            t_decode = time.perf_counter() - t0
            results = await anyio.to_thread.run_sync(
                lambda: self.pipeline.analyse_many([correct(up.rgb, preprocess) for up in ups])
            )
            readings = []
            for t, result in zip(times, results, strict=True):
                top = reported(result)
                held = self.pipeline.abstention(result["lesions"], top)
                readings.append(Reading(t, top["label"], max(top["probabilities"].values()), held["abstain"]))
            decision = window(readings, st)
            response = {
                **decision,
                "frames": len(frames),
                "readings": [
                    {"t": r.t, "label": r.label, "probability": round(r.probability, 5), "abstain": r.abstain}
                    for r in readings
                ],
                "stability": st.model_dump(),
            }
            if decision["confirmed"]:
                last = decision["run"]["last_frame"]
                extra = self.pipeline.answer(results[last], language)
                answer = await self._respond(
                    ups[last], [preprocess], [results[last]], extra, uuid.uuid4().hex, "/predict/frames", t0, t_decode
                )
                response.update(request_id=answer["request_id"], answer=answer)
            else:
                REQUESTS.labels(endpoint="/predict/frames", status="200").inc()
            return JSONResponse(response)
        except InputError as e:
            return _error(e, "/predict/frames")

    @app.post("/predict/json")
    async def predict_json(self, request: Request):
        """For services: ``{"image": base64, "preprocess": ..., "compare": ..., "language": ...}``."""
        try:
            spec = await _json_body(request)
            opts = _options(spec.get("preprocess", "none"), spec.get("compare", False), spec.get("language"))
            return await self._predict(from_base64(spec["image"]), *opts, endpoint="/predict/json")
        except InputError as e:
            return _error(e, "/predict/json")

    @app.post("/feedback")
    async def feedback(self, request: Request):
        """A clinician-confirmed label for a logged prediction. Needs the API key (X-API-Key)."""
        try:
            _reviewer(request, "feedback")
            body = await _read_body(request)
            try:
                spec = json.loads(body)
            except ValueError as e:
                raise InputError(400, "malformed JSON", str(e), "json") from e
            if not isinstance(spec, dict):
                raise InputError(422, "invalid feedback", "send a JSON object", "invalid")
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
            box = _box(spec.get("box"))
            prediction = await anyio.to_thread.run_sync(self.log.get, str(spec["request_id"]))
            if prediction is None:
                raise InputError(
                    404, "unknown request_id", f"no prediction {spec['request_id']!r} is logged", "unknown"
                )
            fid = await anyio.to_thread.run_sync(
                self.log.add_feedback, prediction["request_id"], label, str(spec["reviewer"]).strip()[:200], box
            )
            REQUESTS.labels(endpoint="/feedback", status="201").inc()
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
                },
                status_code=201,
            )
        except InputError as e:
            return _error(e, "/feedback")

    @app.get("/review")
    async def review(self, request: Request, limit: int = 20):
        """The review queue: unconfirmed predictions with a stored photo, ranked by what a confirmation would teach
        the model (components/review.py). Needs a reviewer key (X-API-Key)."""
        from components.review import rank

        try:
            _reviewer(request, "review")
            if not 1 <= limit <= 200:
                raise InputError(422, "invalid limit", f"limit={limit}; use 1 to 200", "options")
            rows, blind = await anyio.to_thread.run_sync(self.log.unconfirmed, max(limit * 10, 500))
            p = self.pipeline
            items = rank(rows, p.threshold, p.ood_threshold, limit)
            REQUESTS.labels(endpoint="/review", status="200").inc()
            return JSONResponse(
                {"items": items, "classes": list(CFG.classes.names), "considered": len(rows), "unreviewable": blind}
            )
        except InputError as e:
            return _error(e, "/review")

    @app.get("/review/{request_id}/image")
    async def review_image(self, request: Request, request_id: str):
        """The stored photo of a logged prediction, for the reviewer (X-API-Key)."""
        from fastapi.responses import FileResponse

        try:
            _reviewer(request, "review")
            row = await anyio.to_thread.run_sync(self.log.get, request_id)
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
        except InputError as e:
            return _error(e, "/review/image")

    @app.get("/report/batch.csv")
    async def report_csv(self, ids: str = "", language: str | None = None):
        """The CSV of a batch of logged predictions (``ids``: comma-separated request ids), one row per lesion, UTF-8
        with a BOM (Excel opens it with the right characters)."""
        try:
            return await self._batch_csv(ids, language)
        except InputError as e:
            return _error(e, "/report/batch.csv")

    @app.post("/report/batch.csv")
    async def report_csv_post(self, request: Request):
        """As GET, for long batches: ``{"request_ids": [...], "language": ...}``."""
        try:
            spec = await _json_object(request)
            return await self._batch_csv(spec.get("request_ids"), spec.get("language"))
        except InputError as e:
            return _error(e, "/report/batch.csv")

    @app.get("/report/{request_id}.pdf")
    async def report_pdf(self, request_id: str, language: str | None = None):
        """The PDF report of a logged prediction (with patient fields kept under consent, if any)."""
        try:
            return await self._report(request_id, language, None, None)
        except InputError as e:
            return _error(e, "/report")

    @app.post("/report/{request_id}.pdf")
    async def report_pdf_post(self, request: Request, request_id: str):
        """The PDF report with patient fields: ``{"patient": {"name", "patient_id", "birth_date", "sex", "notes"},
        "consent": false, "language": ...}``. The fields are printed; they are stored (and shown in later reports of
        this request) only with ``"consent": true``."""
        try:
            spec = await _json_object(request)
            return await self._report(request_id, spec.get("language"), spec.get("patient"), spec.get("consent"))
        except InputError as e:
            return _error(e, "/report")

    @app.get("/reviewer", response_class=HTMLResponse)
    def reviewer_page(self):
        return HTMLResponse(REVIEW_PAGE.read_text(encoding="utf-8"))

    @app.get("/", response_class=HTMLResponse)
    def page(self):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))


DrSpot.add_asgi_middleware(_ReadyzWithVersions)
