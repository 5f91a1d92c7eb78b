"""The DrSpot BentoML service: the two-stage endpoint, its operations endpoints and the web page.

Run with ``drspot serve`` (the Bento built by ``drspot deploy``) or, from a checkout,
``bentoml serve serving.service:DrSpot``. The models are the registry's champions as copied into
the Bento model store by ``drspot deploy`` (tags ``drspot-classifier`` / ``drspot-detector``).

Public endpoints are a FastAPI app mounted on the service (``serving/app.py``, its routes in ``serving/routes/`` by
concern), so every refusal is a 4xx with the contract's ``{"error", "detail"}`` body; concurrent requests' pictures
are merged into one model call in process (``serving.batching``, :mod:`serving.batcher`). This module holds the
service itself: the models, the batched model stage, and the steps every prediction route shares (analyse, answer,
log).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import bentoml
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from components.monitoring.quality import reported
from serving.app import (
    ABSTENTIONS,
    CFG,
    CLASSIFIER_TAG,
    DETECTOR_TAG,
    FALLBACKS,
    HOME,
    LATENCY,
    MODEL_BATCH,
    PHOTO_BUDGET,
    READY,
    REQUESTS,
    ReadyzWithVersions,
    S,
    app,
)
from serving.batcher import Batcher, Overloaded
from serving.inputs import InputError, read_image
from serving.pipeline import QUALITY_KEYS, Pipeline, correct
from serving.routes import pages, predict, reports, review

PREP_THREADS = 1  # threads decoding and correcting photos at once, beside the model's (bench/serving.py)
LOG_BATCH = 64  # most answers' rows written in one transaction
LOG_WAIT_MS = 10**9  # a row waiting for the log is never shed: its answer is computed; the write retries itself

for _routes in (predict, review, reports, pages):
    app.include_router(_routes.router)


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
        p = self.pipeline  # the model steps a request awaits (serving/batcher.py merges them across requests)
        self.steps = {
            "analyse": p.analyse_many,
            "locate": p.locate,
            "lesions": lambda items: p.lesions([img for img, _ in items], [plan for _, plan in items]),
        }
        self._batcher: Batcher | None = None
        self._log_writer: Batcher | None = None  # the prediction log's group commit (:meth:`record`)
        self._cpu: anyio.CapacityLimiter | None = None
        # the model thread: every model call runs on it, batched or not (serving.batching off: one call at a time, as
        # the pipeline's lock has it anyway); each thread calling PyTorch starts an OpenMP team, and two teams slow
        # each other (serving/threads.py)
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drspot-model")
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
                "detector_session": self.pipeline.detector_session,
                "stability": S.stability.model_dump(),
                "quality_limits": {
                    "source": self.pipeline.quality_source,
                    **{k: getattr(self.pipeline.serving, k) for k in QUALITY_KEYS},
                },
                "ood": {"source": self.pipeline.ood_source, "threshold": self.pipeline.ood_threshold},
                "profile": CFG.profile,
                # what chose it: the configuration the Bento was deployed with, or an explicit option of `drspot serve`
                "config_source": os.environ.get(
                    "DRSPOT_CONFIG_SOURCE", "DRSPOT_CONFIG" if os.environ.get("DRSPOT_CONFIG") else "default"
                ),
                "config_digest": CFG.digest(),
                "state_home": str(HOME),
                "prediction_log": describe(CFG),
                "images_dir": str(CFG.resolve(S.images_dir)) if S.store_images else None,
            }
        )

    async def cpu(self, fn, *args):
        """``fn(*args)`` in a worker thread, at most :data:`PREP_THREADS` at once: decoding and corrections of many
        concurrent requests would otherwise contend with the model's thread for the cores and the GIL."""
        if self._cpu is None:
            self._cpu = anyio.CapacityLimiter(PREP_THREADS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._cpu)

    def batcher(self) -> Batcher:
        """The model stage's batcher, created in the worker's event loop on first use."""
        if self._batcher is None:
            self._batcher = Batcher(
                self.steps,
                S.max_batch_size,
                S.max_latency_ms,
                thread=self._model_thread,
                observe=lambda kind, n: MODEL_BATCH.labels(kind=kind).observe(n),
            )
        return self._batcher

    async def record(self, row: dict[str, Any]) -> str:
        """Log an answer's row; the request id it is logged under (serving/store.py ``record``). Rows of answers that
        finish together share one transaction, written by one thread (a group commit; measured at concurrency 8, the
        service without any log write answered 95 photos/s against 71 with one transaction per answer)."""
        if self._log_writer is None:
            self._log_writer = Batcher({"record": self.log.record_many}, LOG_BATCH, LOG_WAIT_MS, "log")
        (logged,) = await self._log_writer.submit("record", [row])
        if isinstance(logged, Exception):
            raise logged
        return logged

    async def model(self, kind: str, items: list[Any]) -> list[Any]:
        """The pipeline's ``analyse`` / ``locate`` / ``lesions`` step over ``items``: batched with other requests'
        when ``serving.batching`` is on (a 503 with Retry-After when the queue is over its budget), else one call
        at a time on the model thread."""
        if not S.batching:
            return await asyncio.get_running_loop().run_in_executor(self._model_thread, self.steps[kind], items)
        try:
            return await self.batcher().submit(kind, items)
        except Overloaded as e:
            raise InputError(
                503, "busy", f"the model queue is full ({e}); retry shortly", "overloaded", {"Retry-After": "1"}
            ) from e

    async def answer_photo(
        self, data: bytes, preprocess: str, compare: bool, language: str, endpoint: str, key: str | None = None
    ):
        t0 = time.perf_counter()
        up = await self.cpu(read_image, data, self.pipeline.serving)
        t_decode = time.perf_counter() - t0
        # compare: the original beside the corrected photo (colour constancy when none was asked for)
        corrected = preprocess if preprocess != "none" else "color_constancy"
        variants = ["none", corrected] if compare else [preprocess]
        # the corrections run off the event loop (colour constancy and CLAHE are whole-picture numpy work); the photo
        # as sent needs no thread
        images = [up.rgb] if variants == ["none"] else await self.cpu(lambda: [correct(up.rgb, v) for v in variants])
        results = await self.model("analyse", images)
        extra = self.pipeline.answer(results[-1], language)
        response = await self.respond(up, variants, results, extra, uuid.uuid4().hex, endpoint, t0, t_decode, key)
        return JSONResponse(response)

    @staticmethod
    def image_part(up) -> dict[str, Any]:
        w, h = up.size
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

    async def respond(
        self,
        up,
        variants: list[str],
        results: list[dict[str, Any]],
        extra: dict[str, Any],
        request_id: str,
        endpoint: str,
        t0: float,
        t_decode: float,
        key: str | None = None,
    ) -> dict[str, Any]:
        """The answer to a prediction (the last variant's result is the answer), logged before it is returned: once
        per idempotency ``key`` (a request sent again with it is answered under the first one's id, ``replayed``)."""
        main, compare = results[-1], len(variants) > 1
        extra = dict(extra)
        w, h = up.size
        response = {
            "request_id": request_id,
            # read before any class: the answer may hold the class back (the probabilities stay below)
            "abstain": extra.pop("abstain"),
            "abstain_reason": extra.pop("abstain_reason"),
            "ood_score": extra.pop("ood_score"),
            "image": self.image_part(up),
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
        image_path = await anyio.to_thread.run_sync(self.store_photo, up) if S.store_images else None
        top = reported(main)
        row = {
            "request_id": request_id,
            "created_at": dt.datetime.now(dt.UTC),  # answered now; written with the answers finishing beside it
            "image_sha256": up.sha256,
            "width": w,
            "height": h,
            "format": up.format,
            "quality": up.quality,
            "embedding": main["embedding"],
            "lesions": main["lesions"],
            "label": top["label"],
            "confidence": top["probabilities"][top["label"]],  # of the answered class
            "malignant_probability": top["malignant_probability"],
            "risk": top["risk"],
            "fallback": main["fallback"],
            "fallback_reason": main["fallback_reason"],
            "preprocess": variants[-1],
            "classifier_version": self.versions["classifier"],
            "detector_version": self.versions["detector"],
            "image_path": image_path,
            "variants": {v: reported(r)["label"] for v, r in zip(variants, results, strict=True)} if compare else None,
            "idempotency_key": key,
        }
        try:
            logged = await self.record(row)
        except OperationalError as e:  # the database stayed out of reach (serving/store.py retried): not answered
            raise InputError(
                503,
                "prediction log unavailable",
                f"the answer could not be logged, so it is not given: {type(e).__name__}; retry (with an "
                "Idempotency-Key it is logged once)",
                "log_unavailable",
                {"Retry-After": "5"},
            ) from e
        if logged != request_id:  # sent before with this key: answered under the first request's id, logged once
            response.update(request_id=logged, replayed=True)
        if image_path is None and S.report_photos:
            self.keep_photo(logged, up.data)
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

    async def stream_stages(
        self, up, preprocess: str, language: str, t0: float, t_decode: float, events, key: str | None = None
    ) -> None:
        """One prediction stage by stage, each stage's event put on ``events`` the moment it is known: quality,
        detection, one classification per lesion, guidance, then done with the whole answer (the same as /predict's,
        logged the same way). Cancelled when the client goes (serving/routes/predict.py): its work stops, and a
        prediction nobody received is not logged."""
        endpoint = "/predict/stream"
        try:
            request_id = uuid.uuid4().hex
            await events.put(("quality", {"request_id": request_id, "image": self.image_part(up)}))
            img = await self.cpu(correct, up.rgb, preprocess)
            t1 = time.perf_counter()
            [(plan, err)] = await self.model("locate", [img])
            t2 = time.perf_counter()
            found = [{"box": b, "detector_confidence": c} for b, c in plan] if err is None else []
            await events.put(("detection", {"boxes": found, "fallback": err is not None, "fallback_reason": err}))
            lesions: list[dict[str, Any]] = []
            embedding = None
            for i, pair in enumerate(plan):
                [(one, emb)] = await self.model("lesions", [(img, ([pair], err))])
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
            response = await self.respond(up, [preprocess], [main], extra, request_id, endpoint, t0, t_decode, key)
            await events.put(("done", response))
        except InputError as e:  # the model queue over its budget: the stream's last event says so
            await events.put(("error", e.body()))
        except Exception as e:  # after the first event the status is sent: the failure is the last event
            REQUESTS.labels(endpoint=endpoint, status="500").inc()
            await events.put(("error", {"error": "analysis failed", "detail": f"{type(e).__name__}: {e}"}))

    def keep_photo(self, request_id: str, data: bytes) -> None:
        self.photos[request_id] = data
        while len(self.photos) > S.report_photos or sum(map(len, self.photos.values())) > PHOTO_BUDGET:
            self.photos.popitem(last=False)

    def store_photo(self, up) -> str:
        return self.log.store_image(up.sha256, up.data, up.format)


DrSpot.add_asgi_middleware(ReadyzWithVersions)
