"""The Ray Serve application: a FastAPI ingress in front of a batched model deployment.

``RayskyIngress`` validates and decodes uploads and encodes the response PNGs (see
:mod:`raysky.serve.api`); ``LesionModel`` holds one :class:`raysky.inference.LesionPipeline`
per replica and scores requests in batches with ``@serve.batch``. Each replica runs its
pipeline on a single dedicated thread, one batch at a time, so Grad-CAM's autograd pass never
runs concurrently on the same model, however many requests are in flight.

``build_application`` builds the application from an :class:`AppConfig` (what ``raysky serve``
and ``run_server`` call); ``build_app`` is its typed application builder for Serve's own tools
(``serve run raysky.serve.app:build_app key=value ...``, ``serve run infra/serve/raysky.yaml``).

No ``from __future__ import annotations`` here: Serve reads ``build_app``'s parameter annotation
as a class to pick its typed argument model, and a postponed annotation would be a string.
"""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from raysky.inference import LesionPipeline, LesionPrediction
from raysky.models.card import build_card
from raysky.models.checkpoint import read_checkpoint_meta
from raysky.models.runtime import on_torch_thread, set_torch_threads, torch_executor
from raysky.serve.api import ApiOptions, ServiceUnavailable, create_api
from raysky.serve.batching import BatchQueue
from raysky.serve.config import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_INFLIGHT_PIXELS,
    AppArgs,
    AppConfig,
)
from raysky.serve.security import (
    key_digest,
    replica_checker,
    require_keys_or_permission,
    validate_api_keys,
)

logger = logging.getLogger(__name__)

MODEL_DEPLOYMENT = "LesionModel"
INGRESS_DEPLOYMENT = "RayskyIngress"
INGRESS_NUM_CPUS = 0.25
"""The ingress mostly awaits the model; a quarter CPU keeps it schedulable next to replicas."""
READY_TIMEOUT_S = 10.0


@serve.deployment(name=MODEL_DEPLOYMENT, max_ongoing_requests=16, max_constructor_retry_count=3,
                  graceful_shutdown_timeout_s=30)
class LesionModel:
    """One segmenter + classifier + Grad-CAM pipeline per replica, scored in batches.

    ``@serve.batch`` gathers requests that arrive within the batch wait and hands them to a
    :class:`~raysky.serve.batching.BatchQueue`, which gives the model up to ``max_batch_size``
    queued requests each time it is free: requests that piled up behind a busy model run as
    one batch, and an idle model starts at once. The pipeline runs on the process's single
    torch thread (:func:`raysky.models.runtime.on_torch_thread`), one batch at a time, so
    Grad-CAM's autograd pass never runs concurrently on the same model.

    Batching is tuned through ``user_config`` (``max_batch_size``, ``batch_wait_timeout_s``),
    so changing it with ``serve deploy`` reconfigures replicas without reloading the models.
    """

    def __init__(self, segmenter: str, classifier: str, use_gpu: bool = False,
                 precision: str = "fp32", threads: int = 1, tta: bool = False):
        # Ray starts replicas with OMP_NUM_THREADS=1; without this a CPU replica uses one core.
        self.threads = on_torch_thread(set_torch_threads, threads)
        self.pipeline = on_torch_thread(LesionPipeline.from_uris, segmenter, classifier,
                                        use_gpu, precision, tta)
        self._batches = BatchQueue(self.run_batch, torch_executor(), DEFAULT_MAX_BATCH_SIZE)
        self._stats = {"batches": 0, "requests": 0, "largest_batch": 0, "compute_s": 0.0}
        # Built once from the checkpoints' own config.json: what /v1/model shows a reviewer.
        self.model_cards = {"segmenter": build_card(self.pipeline.segmenter_meta),
                            "classifier": build_card(self.pipeline.classifier_meta)}
        logger.info("LesionModel ready: %s + %s, %d torch threads",
                    self.pipeline.segmenter_version, self.pipeline.classifier_version, self.threads)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: the batch size limit and how long a batch waits to fill."""
        self._batches.max_batch_size = int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self._admit.set_max_batch_size(self._batches.max_batch_size)
        self._admit.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s",
                                                              DEFAULT_BATCH_WAIT_S)))

    async def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """Score one validated request (``image`` RGB uint8 array, ``metadata``, ``explain``,
        ``mask``); it is batched with whatever else is waiting for the model."""
        scored = await self._admit(request)
        return await scored

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _admit(self, requests: list[dict[str, Any]]) -> list[asyncio.Future]:
        # Returns at once: Serve lets one batch at a time into this method, so waiting here
        # for the model would keep later batches out of the queue, where they can merge.
        return self._batches.submit(requests)

    def run_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the pipeline over a batch; requests with and without ``explain`` run apart."""
        started = time.perf_counter()
        results: list[dict[str, Any] | None] = [None] * len(requests)
        for explain in (True, False):
            index = [i for i, r in enumerate(requests) if bool(r.get("explain", True)) is explain]
            if not index:
                continue
            predictions = self.pipeline([requests[i]["image"] for i in index],
                                        [requests[i].get("metadata") or {} for i in index],
                                        explain=explain)
            for i, prediction in zip(index, predictions, strict=True):
                results[i] = self._to_response(prediction, bool(requests[i].get("mask", True)))
        self._stats["batches"] += 1
        self._stats["requests"] += len(requests)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(requests))
        self._stats["compute_s"] += time.perf_counter() - started
        return results  # type: ignore[return-value]

    def _to_response(self, prediction: LesionPrediction, want_mask: bool) -> dict[str, Any]:
        heatmap = None
        if prediction.heatmap is not None:
            # 8 bits are all a PNG carries anyway; quantising here shrinks the reply 4x.
            heatmap = np.rint(prediction.heatmap * 255.0).astype(np.uint8)
        return {
            "classes": list(self.pipeline.classes),
            "probabilities": [float(p) for p in prediction.probabilities],
            "predicted_class": prediction.predicted_class,
            "malignant_prob": prediction.malignant_prob,
            "lesion_area_frac": prediction.lesion_area_frac,
            "lesion_focus": prediction.lesion_focus,
            "refer": prediction.refer,
            "ood_score": prediction.ood_score,
            "ood": prediction.ood,
            "ita_deg": prediction.ita_deg,
            "skin_tone": prediction.skin_tone,
            "mask": prediction.mask if want_mask else None,
            "heatmap": heatmap,
            "segmenter_version": self.pipeline.segmenter_version,
            "classifier_version": self.pipeline.classifier_version,
            "calibration_version": self.pipeline.calibration_version,
        }

    async def info(self) -> dict[str, Any]:
        """Classes, input sizes, versions, batching and this replica's batch counters."""
        pipeline = self.pipeline
        return {
            "classes": list(pipeline.classes),
            "malignant_classes": [pipeline.classes[i] for i in pipeline.malignant],
            "segmenter_version": pipeline.segmenter_version,
            "classifier_version": pipeline.classifier_version,
            "calibration_version": pipeline.calibration_version,
            "segmenter_input_size": pipeline.segmenter_meta["input_size"],
            "classifier_input_size": pipeline.classifier_meta["input_size"],
            "metadata_fields": list(pipeline.vocab.fields) if pipeline.vocab else [],
            "device": str(pipeline.device),
            "precision": pipeline.precision,
            "tta": pipeline.tta,
            "torch_threads": self.threads,
            "max_batch_size": self._admit._get_max_batch_size(),
            "batch_wait_timeout_s": self._admit._get_batch_wait_timeout_s(),
            "replica_stats": dict(self._stats),
            "model_card": self.model_cards,
        }


class ServeHandleBackend:
    """The API's :class:`~raysky.serve.api.PredictBackend` over a handle to ``LesionModel``.

    Serve raises ``BackPressureError`` when the model's ``max_queued_requests`` is reached;
    it becomes a JSON 503 with ``Retry-After`` instead of Serve's plain-text one.
    """

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def _call(self, method: str, *args, timeout_s: float | None = None) -> dict[str, Any]:
        try:
            response = getattr(self._handle, method).remote(*args)
            if timeout_s is None:
                return await response
            return await asyncio.wait_for(response, timeout_s)
        except BackPressureError:
            raise ServiceUnavailable("the model is at capacity; retry shortly") from None
        except (DeploymentUnavailableError, RayActorError, asyncio.TimeoutError) as exc:
            raise ServiceUnavailable(
                f"no model replica is available ({type(exc).__name__}); retry shortly"
            ) from None

    async def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """Score one request on some model replica."""
        return await self._call("predict", request)

    async def info(self) -> dict[str, Any]:
        """Describe the models of some model replica."""
        return await self._call("info", timeout_s=READY_TIMEOUT_S)


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=128, max_queued_requests=512)
@serve.ingress()
class RayskyIngress:
    """HTTP ingress: FastAPI app built per replica over a handle to the model deployment.

    ``key_digests`` are the digests of the keys its deployer checked; ``None`` makes the replica
    read the keys of its own node (``api_keys_file``, ``RAYSKY_API_KEYS_FILE`` or
    ``RAYSKY_API_KEYS``). Without keys it refuses to start unless ``allow_unauthenticated``.
    """

    def __init__(self, model: DeploymentHandle, max_body_bytes: int, max_pixels: int,
                 access_log: str | None = None,
                 max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS,
                 key_digests: tuple[bytes, ...] | None = None, api_keys_file: str | None = None,
                 allow_unauthenticated: bool = False, enable_docs: bool = False):
        self._backend = ServeHandleBackend(model)
        self._options = ApiOptions(max_body_bytes=max_body_bytes, max_pixels=max_pixels,
                                   access_log=access_log,
                                   max_inflight_pixels=max_inflight_pixels,
                                   enable_docs=enable_docs)
        self._keys = replica_checker(key_digests, api_keys_file, allow_unauthenticated)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built in the replica, after __init__, so limits and API keys come from this
        # replica's arguments and node rather than from import time.
        return create_api(self._backend, self._options, self._keys)


def check_checkpoints(config: AppConfig) -> None:
    """Fail fast, with the URI in the message, on a missing or swapped checkpoint.

    Without this, replicas would crash-loop in their constructors and the deploy would only
    fail after several retries.
    """
    for uri, kind in ((config.segmenter, "segmenter"), (config.classifier, "classifier")):
        read_checkpoint_meta(uri, kind)


def check_api_keys(config: AppConfig) -> tuple[bytes, ...] | None:
    """Digests of the caller's ``api_keys``, or ``None`` when the replicas read their node's.

    Either way an app without keys is refused here, before any replica starts, unless it is
    allowed to run unauthenticated; the replicas check again where the keys are read.
    """
    if config.api_keys is None:
        # Only checked here; each replica reads the keys of its own node.
        replica_checker(None, config.api_keys_file, config.allow_unauthenticated)
        return None
    digests = tuple(key_digest(k) for k in validate_api_keys(config.api_keys, "api_keys"))
    require_keys_or_permission(digests, config.allow_unauthenticated)
    return digests


def build_app(args: AppArgs) -> serve.Application:
    """Typed application builder for ``serve run``/``serve deploy`` (``raysky.serve.app:build_app``).

    Serve validates the application arguments against :data:`~raysky.serve.config.AppArgs`
    before calling this (the argument's annotation tells it to), so the ``key=value`` strings
    of ``serve run`` arrive as the types they name, and an unknown or ill-typed argument fails
    there, naming it, before any actor starts. A plain dict (a Python caller) is validated the
    same way here. ``segmenter`` and ``classifier`` are required; see :func:`build_application`.
    """
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(dict(args or {}))
    return build_application(args.to_config())


def build_application(config: AppConfig) -> serve.Application:
    """The two deployments for ``config``, after checking its checkpoints and API keys.

    Scaling and queue bounds set here are defaults that a Serve config's ``deployments:``
    section may override. Without API keys (see :mod:`raysky.serve.security`) it raises unless
    ``allow_unauthenticated`` is set.
    """
    check_checkpoints(config)
    key_digests = check_api_keys(config)
    model = LesionModel.options(
        autoscaling_config={
            "min_replicas": config.min_replicas,
            "initial_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing,
        },
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": 1 if config.use_gpu else 0,
                           "memory": config.model_memory_bytes},
        user_config={"max_batch_size": config.max_batch_size,
                     "batch_wait_timeout_s": config.batch_wait_timeout_s},
    ).bind(config.segmenter, config.classifier, config.use_gpu, config.precision, config.threads,
           config.tta)
    # No runtime_env: the dashboard and state API show it in plain text (see security.py).
    return RayskyIngress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.ingress_max_queued_requests,
        ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
    ).bind(model, config.max_body_bytes, config.max_pixels, config.access_log,
           config.max_inflight_pixels, key_digests, config.api_keys_file,
           config.allow_unauthenticated, config.enable_docs)
