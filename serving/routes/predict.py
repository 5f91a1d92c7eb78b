"""The prediction routes: ``/predict`` (multipart), ``/predict/json``, ``/predict/stream`` (Server-Sent Events,
stage by stage) and ``/predict/frames`` (a camera's frames, answered once a class holds)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Any

from bentoml import get_current_service
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from components.monitoring.quality import reported
from serving.app import REQUESTS, RUNNING, S, idempotency_key, json_body, json_object, multipart_image, options
from serving.inputs import InputError, from_base64, read_image
from serving.pipeline import correct

router = APIRouter()


@router.post("/predict")
async def predict(
    request: Request,
    preprocess: str = "none",
    compare: str = "false",
    language: str | None = None,
    svc: Any = Depends(get_current_service),
):
    """Multipart upload, field ``image``. Query: preprocess, compare, language."""
    opts, key = options(preprocess, compare, language), idempotency_key(request)
    data = await multipart_image(request, "or JSON to /predict/json")
    return await svc.answer_photo(data, *opts, endpoint="/predict", key=key)


@router.post("/predict/stream")
async def predict_stream(
    request: Request, preprocess: str = "none", language: str | None = None, svc: Any = Depends(get_current_service)
):
    """The answer as Server-Sent Events, each as soon as it is known: ``quality``, ``detection``, one
    ``classification`` per lesion, ``guidance``, ``done`` (the whole answer, as /predict's) or ``error``. The
    photo as /predict takes it (multipart field ``image``) or as JSON ``{"image": base64, "preprocess",
    "language"}``. A refused request is a plain 4xx JSON answer, before any event."""
    import asyncio

    from fastapi.responses import StreamingResponse

    if request.headers.get("content-type", "").startswith("application/json"):
        spec = await json_body(request)
        preprocess, language = spec.get("preprocess", preprocess), spec.get("language", language)
        opts = options(preprocess, "false", language)
        data = from_base64(spec["image"])
    else:
        opts = options(preprocess, "false", language)
        data = await multipart_image(request, 'or JSON {"image": "<base64>"}')
    t0 = time.perf_counter()
    up = await svc.cpu(read_image, data, svc.pipeline.serving)
    t_decode = time.perf_counter() - t0
    events: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(svc.stream_stages(up, opts[0], opts[2], t0, t_decode, events, idempotency_key(request)))
    RUNNING.add(task)
    task.add_done_callback(RUNNING.discard)

    async def sse():
        try:
            while True:
                name, payload = await events.get()
                yield f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                if name in ("done", "error"):
                    return
        finally:  # the client left (the response is cancelled): the analysis stops with it, its queued work dropped
            if not task.done():
                task.cancel()

    return StreamingResponse(
        sse(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


def _header_pixels(data: bytes) -> int:
    """Width x height from an image's header (nothing decoded); 0 when it has none (read_image then refuses it)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            w, h = probe.size
            return w * h
    except Exception:  # noqa: BLE001 - not an image: read_image says so, with the frame's index
        return 0


@contextlib.contextmanager
def _frame(i: int):
    """A refusal inside names the frame it is about."""
    try:
        yield
    except InputError as e:
        raise InputError(e.status, e.error, f"frame {i}: {e.detail}", e.reason) from e


def _same_size(first: Any, up: Any, i: int) -> None:
    if up.size != first.size:
        (w0, h0), (w, h) = first.size, up.size
        raise InputError(
            422,
            "frames differ in size",
            f"frame {i} is {w}x{h}, frame 0 is {w0}x{h0}: the frames of one sequence come from one camera",
            "frames",
        )


@router.post("/predict/frames")
async def predict_frames(request: Request, svc: Any = Depends(get_current_service)):
    """Frames of one lesion in time order (a camera): ``{"frames": [{"image": base64, "t": seconds}, ...],
    "preprocess", "language"}``. A class is confirmed only when it holds as ``serving.stability`` says
    (serving/stability.py); then the last frame of the run is answered and logged as /predict's photo is
    (``answer``, ``request_id``). Every frame's reading comes back either way, with the reason."""
    from serving.stability import Reading, window

    spec, key = await json_object(request), idempotency_key(request)
    frames, st = spec.get("frames"), S.stability
    if not isinstance(frames, list) or not frames:
        raise InputError(422, "missing frames", 'send {"frames": [{"image": "<base64>", "t": 0.0}, ...]}', "missing")
    if len(frames) > st.max_frames:
        raise InputError(
            422, "too many frames", f"{len(frames)} frames; at most {st.max_frames} in one request", "frames"
        )
    times = []
    for i, f in enumerate(frames):
        ok = isinstance(f, dict) and isinstance(f.get("image"), str)
        if not ok or not isinstance(f.get("t"), int | float) or isinstance(f.get("t"), bool):
            raise InputError(422, "invalid frame", f'frame {i}: send {{"image": "<base64>", "t": <seconds>}}', "frames")
        if times and f["t"] <= times[-1]:
            raise InputError(
                422,
                "frames out of order",
                f"frame {i} (t={f['t']:g}) is not after frame {i - 1} (t={times[-1]:g}): send frames in order",
                "frames",
            )
        times.append(float(f["t"]))
    preprocess, _, language = options(spec.get("preprocess", "none"), "false", spec.get("language"))
    t0 = time.perf_counter()
    datas, pixels = [], 0
    for i, f in enumerate(frames):  # the budget first, from the headers alone: nothing is decoded for a refused one
        with _frame(i):
            data = from_base64(f["image"])
        # the frames of a sequence share one pixel budget, counted from each header before it is decoded
        pixels += _header_pixels(data)
        if pixels > S.max_pixels:
            raise InputError(
                422,
                "frames have too many pixels",
                f"frame {i}: the first {i + 1} frames hold {pixels:,} pixels together; the limit for a sequence is "
                f"{S.max_pixels:,} (serving.max_pixels): send smaller frames",
                "too_many_pixels",
            )
        datas.append(data)
    ups, results, t_decode = [], [], 0.0
    for start in range(0, len(datas), S.max_batch_size):  # decoded, analysed and released a batch at a time
        t1 = time.perf_counter()
        chunk = []
        for i in range(start, min(start + S.max_batch_size, len(datas))):
            with _frame(i):
                chunk.append(await svc.cpu(read_image, datas[i], svc.pipeline.serving))
            _same_size((ups or chunk)[0], chunk[-1], i)
        t_decode += time.perf_counter() - t1
        images = await svc.cpu(lambda c=chunk: [correct(up.rgb, preprocess) for up in c])
        results += await svc.model("analyse", images)
        del images
        for up in chunk:
            up.release()
        ups += chunk
    readings = []
    for t, result in zip(times, results, strict=True):
        top = reported(result)
        held = svc.pipeline.abstention(result["lesions"], top)
        readings.append(Reading(t, top["label"], top["probabilities"][top["label"]], held["abstain"]))
    decision = window(readings, st)
    response = {
        **decision,
        "frames": len(frames),
        "readings": [
            {"t": r.t, "label": r.label, "probability": round(r.probability, 5), "abstain": r.abstain} for r in readings
        ],
        "stability": st.model_dump(),
    }
    if decision["confirmed"]:
        last = decision["run"]["last_frame"]
        extra = svc.pipeline.answer(results[last], language)
        answer = await svc.respond(
            ups[last], [preprocess], [results[last]], extra, uuid.uuid4().hex, "/predict/frames", t0, t_decode, key
        )
        response.update(request_id=answer["request_id"], answer=answer)
    else:
        REQUESTS.labels(endpoint="/predict/frames", status="200").inc()
    return JSONResponse(response)


@router.post("/predict/json")
async def predict_json(request: Request, svc: Any = Depends(get_current_service)):
    """For services: ``{"image": base64, "preprocess": ..., "compare": ..., "language": ...}``."""
    spec, key = await json_body(request), idempotency_key(request)
    opts = options(spec.get("preprocess", "none"), spec.get("compare", False), spec.get("language"))
    return await svc.answer_photo(from_base64(spec["image"]), *opts, endpoint="/predict/json", key=key)
