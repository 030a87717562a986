"""The HTTP API of the live endpoint, as a FastAPI app independent of where the model runs.

:func:`create_api` takes a :class:`PredictBackend` (in production, a Ray Serve handle to the
batched model deployment, see :mod:`raysky.serve.app`) and returns the FastAPI app that the
ingress deployment serves: the routes, authentication, error mapping and PNG encoding here, the
access log and body limit in :mod:`raysky.serve.middleware`, upload and metadata validation in
:mod:`raysky.serve.uploads`. Keeping HTTP concerns in these modules keeps the model deployment a
thin wrapper around :class:`raysky.inference.LesionPipeline`.

Every client mistake maps to a JSON error ``{"error": code, "detail": message, ...}`` with a
4xx status; overload and an unavailable model map to 503 with ``Retry-After``. Only a bug in
raysky itself can produce a 500.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from raysky import __version__
from raysky.data.images import (
    DECODE_BYTES_PER_PIXEL,
    DEFAULT_MAX_PIXELS,
    encode_png,
)
from raysky.data.metadata import (
    MAX_AGE_YEARS,
    SEX_SPELLINGS,
)
from raysky.serve.admission import BudgetTimeout, MemoryBudget
from raysky.serve.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT_PIXELS
from raysky.serve.errors import ApiError, BodyTooLarge, ServiceUnavailable, error_responses
from raysky.serve.metrics import RejectionMiddleware, ServeMetrics
from raysky.serve.middleware import (
    ACCESS_SCOPE_KEY,
    AccessLogMiddleware,
    BodyLimitMiddleware,
    configure_access_log,
    error_response,
    scope_request_id,
    too_large,
)
from raysky.serve.probes import add_probes
from raysky.serve.security import ApiKeyChecker, replica_checker
from raysky.serve.uploads import (
    FORM_FIELDS,
    MAX_IMAGE_ID_LENGTH,
    decode_upload,
    parse_metadata,
    upload_header,
)

RESPONSE_PNG_COMPRESS_LEVEL = 1
"""Fast zlib level for the answer's PNGs: encoding stays under a millisecond per 200x150 map."""
READY_CACHE_S = 2.0
"""How long /readyz reuses the model's last answer, so probes cannot fill the model's queue."""

logger = logging.getLogger(__name__)


class PredictBackend(Protocol):
    """Where predictions come from: ``predict`` takes one validated request, ``info`` describes
    the models. Both raise :class:`ServiceUnavailable` when they cannot answer right now."""

    async def predict(self, request: dict[str, Any]) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApiOptions:
    """Request limits of the HTTP layer and where the access log goes, besides stderr.

    ``max_inflight_pixels`` bounds the decoded pixels, counted as 8-bit RGB, this app holds at
    once (see :mod:`raysky.serve.admission`); an upload that finds no room within
    ``admission_timeout_s`` gets 503. ``enable_docs`` serves ``/docs`` and ``/openapi.json``.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    access_log: str | None = None
    max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS
    admission_timeout_s: float = 30.0
    enable_docs: bool = False


class _CachedCall:
    """Awaits ``call`` at most once per ``ttl_s``: concurrent and later callers within that
    time share its outcome, a result or an exception alike."""

    def __init__(self, call, ttl_s: float):
        self._call = call
        self._ttl_s = ttl_s
        self._task: asyncio.Task | None = None
        self._finished_at = -math.inf

    async def __call__(self) -> Any:
        now = time.monotonic()
        if self._task is None or (self._task.done() and now - self._finished_at > self._ttl_s):
            self._task = asyncio.ensure_future(self._call())
            self._task.add_done_callback(self._finished)
        # Shielded: a probe that gives up must not cancel the call the others are waiting on.
        return await asyncio.shield(self._task)

    def _finished(self, task: asyncio.Task) -> None:
        self._finished_at = time.monotonic()
        if not task.cancelled():
            task.exception()  # retrieved here, so a failure nobody awaited is not logged


def _png_base64(array: np.ndarray, is_mask: bool) -> str:
    png = encode_png(array, RESPONSE_PNG_COMPRESS_LEVEL, mask=is_mask)
    return base64.b64encode(png).decode("ascii")


def _encode_maps(result: dict[str, Any], want_mask: bool) -> tuple[str | None, str | None]:
    mask = result.get("mask")
    heatmap = result.get("heatmap")
    mask_png = _png_base64(mask, True) if want_mask and mask is not None else None
    heatmap_png = _png_base64(heatmap, False) if heatmap is not None else None
    return mask_png, heatmap_png


# ---------------------------------------------------------------------------------------------
# The app

# The form is parsed by hand (auth and size checks come before the body is read), so its
# schema is declared here for /docs, where "Try it out" then offers a file picker.
PREDICT_REQUEST_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["image"],
        "properties": {
            "image": {"type": "string", "format": "binary",
                      "description": "JPEG, PNG, TIFF, BMP, WebP or GIF"},
            "age": {"type": "number", "minimum": 0, "maximum": MAX_AGE_YEARS},
            "sex": {"type": "string", "enum": list(SEX_SPELLINGS)},
            "site": {"type": "string", "description": "HAM10000 localization or ISIC "
                     "anatom_site_general, e.g. 'back', 'upper extremity', 'head/neck'"},
            "image_id": {"type": "string", "maxLength": MAX_IMAGE_ID_LENGTH,
                         "description": "echoed back; never logged"},
        },
    }}},
}


@dataclass
class _Upload:
    """One uploaded image: its bytes (until :meth:`take_bytes`), metadata and ``image_id``."""

    data: bytes | None
    metadata: dict
    image_id: str | None

    def take_bytes(self) -> bytes:
        """The bytes, dropping this object's reference so they can be freed once decoded."""
        data, self.data = self.data, None
        return data


async def _read_upload(request: Request) -> _Upload:
    """The uploaded image, its metadata and its ``image_id`` from a multipart form; a body
    that is not one, or lacks the ``image`` file, is the client's mistake (415, 422)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"expected a multipart/form-data body with an 'image' file, got "
                       f"{content_type.split(';')[0] or 'no content type'}")
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=4096)
    try:
        metadata, image_id = parse_metadata(form)
        upload = form.get("image")
        if upload is None:
            raise ApiError(422, "missing_field", "the 'image' file field is required", "image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_field",
                           "'image' must be a file part (with a filename)", "image")
        return _Upload(await upload.read(), metadata, image_id)
    finally:
        await form.close()


async def _run_model(backend: PredictBackend, budget: MemoryBudget, options: ApiOptions,
                     metrics: ServeMetrics, entry: dict, upload: _Upload, request: dict
                     ) -> tuple[dict, tuple[int, int], tuple[str | None, str | None]]:
    """Decode the upload, run the models on it with ``request`` (explain, mask) and encode the
    maps, holding the decoded image's bytes in ``budget`` meanwhile; returns the result, the
    image's (width, height) and the encoded (mask, heatmap). The access-log ``entry`` gains
    the image's size and the model's time."""
    data = upload.take_bytes()
    entry["image_bytes"] = len(data)
    header = upload_header(data, options.max_pixels)
    try:
        async with budget.hold(header.decode_bytes, options.admission_timeout_s):
            with metrics.timed("decode"):
                image = await run_in_threadpool(decode_upload, data, options.max_pixels)
            del data
            # After EXIF orientation, which may swap the header's width and height.
            height, width = image.shape[:2]
            entry["image_width"], entry["image_height"] = width, height
            model_start = time.perf_counter()
            result = await backend.predict({"image": image, "metadata": upload.metadata,
                                            **request})
            # Queueing + batching + compute on the model side; latency_ms minus this is
            # our own.
            entry["model_ms"] = round((time.perf_counter() - model_start) * 1000.0, 2)
            metrics.stage("model", time.perf_counter() - model_start)
            del image
            with metrics.timed("encode"):
                maps = await run_in_threadpool(_encode_maps, result, request["mask"])
    except BudgetTimeout:
        raise ServiceUnavailable("too many large images are being scored; retry "
                                 "shortly") from None
    return result, (width, height), maps


def _response(result: dict, image_id: str | None, size: tuple[int, int],
              maps: tuple[str | None, str | None], elapsed_s: float,
              request_id: str | None) -> dict[str, Any]:
    """The JSON answer to ``POST /v1/predict``: the pipeline's ``result`` for the image of
    ``size`` (width, height), with the encoded mask and heatmap ``maps``."""
    focus = result["lesion_focus"]
    return {
        "image_id": image_id,
        "width": size[0],
        "height": size[1],
        "classes": list(result["classes"]),
        "probabilities": dict(zip(result["classes"], result["probabilities"], strict=True)),
        "predicted_class": result["predicted_class"],
        "malignant_prob": result["malignant_prob"],
        "lesion_area_frac": result["lesion_area_frac"],
        "lesion_focus": None if focus is None or math.isnan(focus) else focus,
        # null when the classifier checkpoint has no calibration (raysky calibrate)
        "refer": result.get("refer"),
        "ood_score": result.get("ood_score"),
        "ood": result.get("ood"),
        "ita_deg": result.get("ita_deg"),
        "skin_tone": result.get("skin_tone"),
        "mask_png": maps[0],
        "heatmap_png": maps[1],
        "segmenter_version": result["segmenter_version"],
        "classifier_version": result["classifier_version"],
        "calibration_version": result.get("calibration_version"),
        "latency_ms": round(elapsed_s * 1000.0, 2),
        "request_id": request_id,
    }


def _add_error_handlers(app: FastAPI, options: ApiOptions) -> None:
    """Every error, the API's own and the framework's, as one JSON error body (see
    :mod:`raysky.serve.errors`); a client's mistake is never a 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(request.scope, exc)

    @app.exception_handler(BodyTooLarge)
    async def _bodytoo_large(request: Request, exc: BodyTooLarge):
        return error_response(request.scope, too_large(options.max_body_bytes))

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable):
        return error_response(request.scope, ApiError(
            503, "unavailable", exc.detail, headers={"Retry-After": str(exc.retry_after_s)}))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]["loc"][-1] if exc.errors() else None
        return error_response(request.scope, ApiError(
            422, "invalid_request", "; ".join(problems), str(first) if first else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        return error_response(request.scope, ApiError(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("request %s failed", scope_request_id(request.scope))
        return error_response(request.scope, ApiError(
            500, "internal_error", "internal error; the request id identifies it in the logs"))


def _add_health_routes(app: FastAPI, readiness: _CachedCall, require_api_key) -> None:
    """``/healthz``, ``/readyz`` and the Open Inference Protocol's probes."""

    @app.get("/healthz", summary="Liveness: the HTTP layer answers",
             responses=error_responses())
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica answers with its models loaded",
             responses=error_responses(503))
    async def readyz() -> dict[str, str]:
        # Unauthenticated, like /healthz, for orchestrator probes: so it says nothing about
        # the models; /v1/model (authenticated) does.
        await readiness()
        return {"status": "ready"}

    add_probes(app, readiness, require_api_key)


def _new_app(options: ApiOptions) -> FastAPI:
    docs = options.enable_docs
    app = FastAPI(
        title="raysky",
        version=__version__,
        description="Explainable skin-lesion classification: one dermoscopy image (plus optional "
        "age, sex and site) in; class probabilities, lesion mask and Grad-CAM heatmap out.",
        # Off by default: the schema maps the API for anyone who can reach the port.
        docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    return app


def _api_key_dependency(keys: ApiKeyChecker):
    """The route dependency that refuses a request without a valid API key (401)."""

    async def require_api_key(request: Request) -> None:
        if not keys.check(request.headers.get("authorization")):
            raise ApiError(401, "unauthorized", "missing or invalid API key "
                           "(send 'Authorization: Bearer <key>')",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


def create_api(backend: PredictBackend, options: ApiOptions | None = None,
               keys: ApiKeyChecker | None = None, metrics: ServeMetrics | None = None) -> FastAPI:
    """Build the FastAPI app over ``backend``.

    ``keys`` defaults to the keys of this process's environment, which must exist (see
    :func:`raysky.serve.security.replica_checker`); an empty :class:`ApiKeyChecker` turns
    authentication off. Routes: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``,
    ``GET /readyz``, and the Open Inference Protocol's health and metadata routes
    (:mod:`raysky.serve.probes`); OpenAPI at ``/docs`` only with ``options.enable_docs``.
    ``metrics`` (default: this replica's, see :mod:`raysky.serve.metrics`) records what the
    model decides, the time per stage and the rejections.
    """
    options = options or ApiOptions()
    keys = keys if keys is not None else replica_checker(None, None, allow_unauthenticated=False)
    # The budget is in bytes; max_inflight_pixels counts pixels of 8-bit RGB.
    budget = MemoryBudget(options.max_inflight_pixels * DECODE_BYTES_PER_PIXEL["RGB"])
    access_logger = configure_access_log(options.access_log)
    metrics = metrics if metrics is not None else ServeMetrics()
    logger.info("raysky API: API-key auth %s",
                f"enabled ({keys.num_keys} keys)" if keys.enabled else "disabled")

    app = _new_app(options)
    readiness = _CachedCall(backend.info, READY_CACHE_S)

    _add_error_handlers(app, options)

    require_api_key = _api_key_dependency(keys)

    _add_health_routes(app, readiness, require_api_key)

    _add_model_routes(app, backend, require_api_key, budget, options, metrics)

    # Order matters: the access log wraps everything, including 413s decided from headers.
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, logger_=access_logger)
    app.add_middleware(RejectionMiddleware, metrics=metrics)
    return app


def _add_model_routes(app: FastAPI, backend: PredictBackend, require_api_key: Callable,
                      budget: MemoryBudget, options: ApiOptions, metrics: ServeMetrics) -> None:
    """``GET /v1/model`` and ``POST /v1/predict``, both behind the API key; every prediction
    shares the decode memory ``budget``, the ``options`` and the ``metrics``."""

    @app.get("/v1/model", dependencies=[Depends(require_api_key)],
             summary="Classes, input sizes, versions, batching and the model cards of the "
             "served models", responses=error_responses(401, 503))
    async def model_info() -> dict[str, Any]:
        return await backend.info()

    @app.post("/v1/predict", dependencies=[Depends(require_api_key)],
              summary="Classify, segment and explain one image",
              openapi_extra={"requestBody": PREDICT_REQUEST_BODY},
              responses=error_responses(401, 415, 422, 503))
    async def predict(
        request: Request,
        explain: bool = Query(True, description="compute the Grad-CAM heatmap"),
        mask: bool = Query(True, description="return the lesion mask as a PNG"),
    ) -> dict[str, Any]:
        """Multipart form: ``image`` (file), optional ``age``, ``sex``, ``site``, ``image_id``.

        Returns probabilities per class, the predicted class, the malignant probability, the
        lesion's area fraction and, as base64 PNGs at the uploaded image's size, the lesion
        mask (0/255) and the Grad-CAM heatmap (8-bit grey, 255 = strongest evidence).
        ``lesion_focus`` is the heatmap's share inside the mask (null without ``explain``).
        With a calibrated classifier the probabilities are calibrated, the predicted class
        applies the calibration's decision offsets (for balanced accuracy; it can differ from
        the most probable class), ``refer`` says whether ``malignant_prob`` reaches the
        referral threshold, and ``ood`` whether ``ood_score`` (higher: less like the
        calibration's dermoscopy; over 1 for the default gate) marks the image as unlike
        dermoscopy (advice only); ``refer``, ``ood_score``, ``ood`` and
        ``calibration_version`` are null without a calibration. ``ita_deg`` and ``skin_tone``
        are the Individual Typology Angle of the skin round the predicted lesion and its
        category, null where too little skin is usable.
        """
        start = time.perf_counter()
        upload = await _read_upload(request)
        entry = request.scope.get(ACCESS_SCOPE_KEY, {})
        result, size, maps = await _run_model(backend, budget, options, metrics, entry, upload,
                                               {"explain": explain, "mask": mask})
        metrics.prediction(result)
        return _response(result, upload.image_id, size, maps,
                         time.perf_counter() - start, entry.get("request_id"))

