"""What every route of the DrSpot service shares: the configuration handed to the service, the FastAPI app with its
error handling, the metrics, the request-body readers and the option checks.

A route refuses a request by raising :class:`serving.inputs.InputError`; the app's one exception handler turns it
into the contract's ``{"error", "detail"}`` 4xx body and counts it. The routes live in ``serving/routes/`` by concern;
``serving/service.py`` defines the BentoML service (models, the batched model stage) and mounts them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import components  # noqa: F401  (offline settings first)
from infra.config import ConfigError, load_config
from infra.env import check_home
from serving.inputs import InputError, body_limit, check_length
from serving.pipeline import PREPROCESS, KnowledgeError, resolve_language
from serving.store import KeyReused

# the configuration `drspot serve` resolved ($DRSPOT_CONFIG) and the state home it handed over ($DRSPOT_HOME):
# a service whose log would land inside its own Bento refuses to start here, naming the setting to give
try:
    CFG = load_config()
except ConfigError as e:
    # a ValueError raised while a Bento loads reads to BentoML as "not a Bento tag", and it reports an unrelated
    # import error instead ("No module named 'drspot'", bentoml/_internal/service/loader.py): raised as what it is
    raise RuntimeError(f"the service's configuration does not load: {e}") from None
HOME = check_home(CFG.home)
S = CFG.serving
# the model tags: pinned by `drspot deploy` as Bento build arguments; else the newest in the store
_ARGS = bentoml.use_arguments()
CLASSIFIER_TAG = getattr(_ARGS, "classifier", None) or os.environ.get(
    "DRSPOT_CLASSIFIER_TAG", "drspot-classifier:latest"
)
DETECTOR_TAG = getattr(_ARGS, "detector", None) or os.environ.get("DRSPOT_DETECTOR_TAG", "drspot-detector:latest")

REQUESTS = bentoml.metrics.Counter(
    name="drspot_requests_total", documentation="requests by endpoint and status", labelnames=["endpoint", "status"]
)
LATENCY = bentoml.metrics.Histogram(
    name="drspot_request_latency_seconds",
    documentation="end-to-end latency of /predict",
    labelnames=["endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
MODEL_BATCH = bentoml.metrics.Histogram(
    name="drspot_model_batch_size",
    documentation="photos (or crops) per model call of the in-process batcher, by kind of call",
    labelnames=["kind"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
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
RUNNING: set[Any] = set()

app = FastAPI(title="DrSpot", description="Two-stage skin-lesion analysis (decision support, not a diagnosis)")


def refuse(e: InputError, endpoint: str) -> JSONResponse:
    REJECTIONS.labels(reason=e.reason).inc()
    REQUESTS.labels(endpoint=endpoint, status=str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors())
    return refuse(InputError(422, "invalid request", detail, "invalid_request"), request.url.path)


async def read_body(request: Request) -> bytes:
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


async def multipart_image(request: Request, alternative: str) -> bytes:
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
    await read_body(request)
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


async def json_object(request: Request, invalid: str = "invalid request") -> dict[str, Any]:
    """A JSON object body, or the 4xx that says what was wrong with it (``invalid``: the title when it is JSON but
    not an object). Only a body that says it is JSON is read as JSON (a form or a text body is refused: 415)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise InputError(
            415, "wrong content type", f"got {ctype or 'no content type'}; send application/json", "content_type"
        )
    body = await read_body(request)
    try:
        spec = json.loads(body, parse_constant=_not_json)
    except RecursionError as e:  # arrays or objects nested thousands deep
        raise InputError(400, "malformed JSON", "nested too deeply", "json") from e
    except ValueError as e:
        raise InputError(400, "malformed JSON", str(e), "json") from e
    if _too_deep(spec, MAX_JSON_DEPTH):  # every reader below recurses (validation, logging, the answer's encoder)
        raise InputError(400, "malformed JSON", f"nested too deeply (more than {MAX_JSON_DEPTH} levels)", "json")
    if not isinstance(spec, dict):
        raise InputError(422, invalid, "send a JSON object", "invalid")
    return spec


MAX_JSON_DEPTH = 16  # DrSpot's deepest request (frames -> frame -> box) is 4 levels


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists or objects more than ``limit`` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return False


def _not_json(word: str) -> None:
    """NaN, Infinity and -Infinity, which Python's json accepts and JSON does not (a frame time of NaN)."""
    raise ValueError(f"{word} is not a JSON number")


async def json_body(request: Request) -> dict[str, Any]:
    """A JSON prediction request: an object with the photo as base64 in ``image``."""
    spec = await json_object(request)
    if not isinstance(spec.get("image"), str):
        raise InputError(422, "missing field 'image'", 'send {"image": "<base64>"}', "missing")
    return spec


def require_reviewer(request: Request, what: str) -> None:
    """A reviewer's key in ``X-API-Key`` (or ``Authorization: Bearer``), or a 401 / 503 that says what is missing."""
    if not os.environ.get(S.feedback_key_env):
        raise InputError(503, f"{what} disabled", f"no reviewer key is configured: set {S.feedback_key_env}", "no_key")
    if not has_reviewer_key(request):
        raise InputError(401, "unauthorised", "a valid reviewer key in the X-API-Key header is required", "auth")


IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (1-128 visible ASCII characters), or None; a POST sent again with the same
    key is answered under its first request id and logged once (serving/store.py)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= 128 or not all(33 <= ord(c) <= 126 for c in key):
        raise InputError(
            400, "invalid idempotency key", f"{IDEMPOTENCY_HEADER}: 1 to 128 visible ASCII characters", "bad_header"
        )
    return key


def options(preprocess: str, compare: Any, language: str | None) -> tuple[str, bool, str]:
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


# what /readyz says only to a caller with the reviewer key: where the state and the patients' data live
PRIVATE_READY = ("state_home", "prediction_log", "images_dir")


def _has_reviewer_key(scope) -> bool:
    """Whether the request (its ASGI scope) carries the configured reviewer key (``X-API-Key`` or a bearer token)."""
    import hmac

    key = os.environ.get(S.feedback_key_env)
    headers = dict(scope.get("headers") or [])
    given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
    return bool(key and given and hmac.compare_digest(given, key.encode("utf-8")))


def has_reviewer_key(request: Request) -> bool:
    return _has_reviewer_key(request.scope)


class ReadyzWithVersions:
    """BentoML's /readyz says only "ready"; DrSpot's also names the models it serves."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz" and scope["method"] == "GET":
            ready = bool(READY)
            shown = READY if _has_reviewer_key(scope) else {k: v for k, v in READY.items() if k not in PRIVATE_READY}
            body = json.dumps({"ready": ready, **shown} if ready else {"ready": False, "detail": "models loading"})
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


# the metrics label of a route whose path holds a request id (the route's template otherwise)
ENDPOINT_LABELS = {"/review/{request_id}/image": "/review/image", "/report/{request_id}.pdf": "/report"}


@app.exception_handler(InputError)
async def _refused(request: Request, exc: InputError) -> JSONResponse:
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    return refuse(exc, ENDPOINT_LABELS.get(template, template))


@app.exception_handler(KeyReused)
async def _key_reused(request: Request, exc: KeyReused) -> JSONResponse:
    """An Idempotency-Key the log holds for another request: the contract's 422, from any route."""
    return await _refused(request, InputError(422, "idempotency key reused", str(exc), "idempotency"))
