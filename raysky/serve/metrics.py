"""Prometheus metrics of the live endpoint: what the model decides, and what it costs.

Ray Serve exports request counts and latencies of its own; these say what the model is
*deciding*, which is where a changed dermoscope or population shows first. They are
``ray.serve.metrics`` objects, so Ray exports them with everything else it exports: scrape
each node's metrics port (``ray start --metrics-export-port``, default: a free port, see
``ray.nodes()``' ``MetricsExportPort``) at ``/metrics``. Ray prefixes every name with ``ray_``
and adds the ``application``, ``deployment`` and ``replica`` labels (the ingress replica that
answered). Names as scraped, with their own labels:

* ``ray_raysky_predictions_total`` (counter): ``predicted_class``; ``refer`` and ``ood``, each
  ``true``, ``false`` or ``none`` (an uncalibrated model decides neither);
* ``ray_raysky_predictions_by_skin_tone_total`` (counter): ``skin_tone``, the ITA category,
  or ``unknown`` where too little skin was usable;
* ``ray_raysky_malignant_prob`` (histogram, buckets every 0.05);
* ``ray_raysky_stage_seconds`` (histogram): ``stage`` is ``decode`` (the upload to pixels),
  ``model`` (queue, batch and models, as the ingress waits for them) or ``encode`` (the
  answer's PNGs);
* ``ray_raysky_rejections_total`` (counter): ``status`` (401, 413, 415, 422, 503, ...) and
  ``reason``, the JSON error code.

Ray aggregates histogram observations into their buckets before export, so a histogram's
``_sum`` is built from bucket midpoints; ``_count`` and the buckets are exact.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from raysky.serve.middleware import ACCESS_SCOPE_KEY

PROBABILITY_BUCKETS = [round(0.05 * i, 2) for i in range(1, 20)]
SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0]
STAGES = ("decode", "model", "encode")
METRIC_NAMES = ("raysky_predictions", "raysky_predictions_by_skin_tone", "raysky_malignant_prob",
                "raysky_stage_seconds", "raysky_rejections")
"""The metrics as declared; Ray exports each as ``ray_<name>`` (counters with ``_total``)."""


def _flag(value: bool | None) -> str:
    return "none" if value is None else str(bool(value)).lower()


class ServeMetrics:
    """The metrics of one ingress replica; every method is a no-op outside a Ray worker (an
    app built in a plain process, as in unit tests of the HTTP layer)."""

    def __init__(self, enabled: bool | None = None):
        import ray

        self.enabled = ray.is_initialized() if enabled is None else enabled
        if not self.enabled:
            return
        from ray.serve.metrics import Counter, Histogram

        self.predictions = Counter(
            "raysky_predictions", description="Predictions answered, by predicted class and by "
            "the referral and out-of-distribution decisions (none: uncalibrated model).",
            tag_keys=("predicted_class", "refer", "ood"))
        self.skin_tones = Counter(
            "raysky_predictions_by_skin_tone", description="Predictions answered, by the ITA "
            "skin-tone category of the skin round the lesion (unknown: too little usable skin).",
            tag_keys=("skin_tone",))
        self.malignant_prob = Histogram(
            "raysky_malignant_prob", description="The malignant probability of each answer.",
            boundaries=PROBABILITY_BUCKETS)
        self.stage_seconds = Histogram(
            "raysky_stage_seconds", description="Seconds per request spent decoding the upload, "
            "waiting for the model (queue, batch, models) and encoding the answer's PNGs.",
            boundaries=SECONDS_BUCKETS, tag_keys=("stage",))
        self.rejections = Counter(
            "raysky_rejections", description="Requests answered with an error, by HTTP status "
            "and error code.", tag_keys=("status", "reason"))

    def prediction(self, result: Mapping[str, Any]) -> None:
        """Count one answered prediction (a model replica's result dict)."""
        if not self.enabled:
            return
        self.predictions.inc(1, tags={"predicted_class": str(result["predicted_class"]),
                                      "refer": _flag(result.get("refer")),
                                      "ood": _flag(result.get("ood"))})
        self.skin_tones.inc(1, tags={"skin_tone": result.get("skin_tone") or "unknown"})
        self.malignant_prob.observe(float(result["malignant_prob"]))

    def stage(self, stage: str, seconds: float) -> None:
        """Record ``seconds`` spent in ``stage`` (one of :data:`STAGES`)."""
        if self.enabled:
            self.stage_seconds.observe(seconds, tags={"stage": stage})

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Record the time the ``with`` body takes as ``stage`` (if it finishes)."""
        started = time.perf_counter()
        yield
        self.stage(stage, time.perf_counter() - started)

    def rejection(self, status: int, reason: str | None) -> None:
        """Count one error answer."""
        if self.enabled:
            self.rejections.inc(1, tags={"status": str(status), "reason": reason or "unknown"})


class RejectionMiddleware:
    """Counts every answer with status 400 or more in ``metrics``, by status and by the error
    code the route or middleware put in the access-log entry (so 413s decided from headers,
    before any route runs, count too). Add it outside the access-log middleware."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.metrics.enabled:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if status >= 400:
                self.metrics.rejection(status, scope.get(ACCESS_SCOPE_KEY, {}).get("error"))
