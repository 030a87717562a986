"""The Open Inference Protocol (v2) health and metadata routes, for gateways and catalogues
that probe them (KServe, Triton, Seldon, ...).

``GET /v2/health/live`` and ``/v2/health/ready`` (``{"live": true}``, ``{"ready": true}``;
readiness asks a model replica, through the same 2-second cache as ``/readyz``),
``GET /v2`` (server metadata), ``GET /v2/models/raysky`` (model metadata: name, versions,
platform, and the inputs and outputs of ``POST /v1/predict``, which stays the route that
scores; there is no ``/infer``) and ``GET /v2/models/raysky/ready``. As the protocol says, 200
means true and a 4xx false; errors are ``{"error": "<message>"}``, and a model name other than
``raysky`` is 404. Model metadata needs an API key, as ``/v1/model`` does; the health routes do
not, like ``/healthz``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from raysky import __version__
from raysky.serve.errors import ServiceUnavailable
from raysky.serve.middleware import ACCESS_SCOPE_KEY

MODEL_NAME = "raysky"
PLATFORM = "pytorch"
NOT_READY_STATUS = 400
"""The protocol: "a 200 status code indicates true and a 4xx status code indicates false"."""

INPUTS = [
    {"name": "image", "datatype": "BYTES", "shape": [1]},
    {"name": "age", "datatype": "FP32", "shape": [1]},
    {"name": "sex", "datatype": "BYTES", "shape": [1]},
    {"name": "site", "datatype": "BYTES", "shape": [1]},
    {"name": "image_id", "datatype": "BYTES", "shape": [1]},
]
"""The form fields of ``/v1/predict``: the encoded image file and the optional metadata."""


def outputs(classes: list[str]) -> list[dict[str, Any]]:
    """The fields of a ``/v1/predict`` answer, as protocol tensors."""
    scalars = [("predicted_class", "BYTES"), ("malignant_prob", "FP32"), ("refer", "BOOL"),
               ("ood", "BOOL"), ("ood_score", "FP32"), ("lesion_area_frac", "FP32"),
               ("lesion_focus", "FP32"), ("ita_deg", "FP32"), ("skin_tone", "BYTES"),
               ("mask_png", "BYTES"), ("heatmap_png", "BYTES")]
    return [{"name": "probabilities", "datatype": "FP32", "shape": [len(classes)]},
            *({"name": name, "datatype": kind, "shape": [1]} for name, kind in scalars)]


def model_version(info: dict[str, Any]) -> str:
    """The served model's one version: the segmenter's, the classifier's and, if calibrated,
    the calibration's, joined by ``+``."""
    parts = [info["segmenter_version"], info["classifier_version"], info.get("calibration_version")]
    return "+".join(p for p in parts if p)


def model_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The protocol's model metadata for a model replica's ``info()``."""
    return {"name": MODEL_NAME, "versions": [model_version(info)], "platform": PLATFORM,
            "inputs": INPUTS, "outputs": outputs(list(info["classes"]))}


def _error(request: Request, status: int, message: str, code: str) -> JSONResponse:
    entry = request.scope.get(ACCESS_SCOPE_KEY)
    if entry is not None:
        entry["error"] = code
    return JSONResponse({"error": message}, status_code=status)


def _unknown_model(request: Request, name: str) -> JSONResponse:
    return _error(request, 404, f"model {name!r} is not served here; the model is "
                  f"{MODEL_NAME!r}", "model_not_found")


def add_probes(app: FastAPI, model_info: Callable[[], Awaitable[dict[str, Any]]],
               require_api_key: Callable[..., Awaitable[None]]) -> None:
    """Add the protocol's routes to ``app``. ``model_info`` answers a model replica's
    ``info()`` (raising :class:`ServiceUnavailable` when none can); ``require_api_key`` is the
    app's authentication dependency."""

    async def ready(request: Request, body: dict[str, Any]) -> JSONResponse | dict[str, Any]:
        try:
            await model_info()
        except ServiceUnavailable as exc:
            return _error(request, NOT_READY_STATUS, f"not ready: {exc.detail}", "not_ready")
        return body

    @app.get("/v2/health/live", summary="Open Inference Protocol liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Open Inference Protocol readiness")
    async def server_ready(request: Request):
        return await ready(request, {"ready": True})

    @app.get("/v2", summary="Open Inference Protocol server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": MODEL_NAME, "version": __version__, "extensions": []}

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol model readiness")
    async def model_ready(name: str, request: Request):
        if name != MODEL_NAME:
            return _unknown_model(request, name)
        return await ready(request, {"name": MODEL_NAME, "ready": True})

    @app.get("/v2/models/{name}", dependencies=[Depends(require_api_key)],
             summary="Open Inference Protocol model metadata (inputs and outputs of /v1/predict)")
    async def metadata(name: str, request: Request):
        if name != MODEL_NAME:
            return _unknown_model(request, name)
        return model_metadata(await model_info())
