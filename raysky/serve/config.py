"""Settings of the live endpoint: what the application is built from, and where it listens.

:class:`AppConfig` is exactly what ``build_app`` takes as application arguments (the ``args:``
block of ``infra/serve/raysky.yaml``); :class:`ServeSettings` adds what only a process that
starts Serve itself needs (Ray address, host, port, application name).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from raysky.data.images import DEFAULT_MAX_PIXELS
from raysky.models.runtime import PRECISIONS

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
"""Largest accepted request body (20 MiB): a full-resolution dermoscopy JPEG is a few MB."""
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.002
"""How long an idle model waits for a batch to fill; requests queued behind a busy model
merge into its next batch regardless (see :mod:`raysky.serve.batching`)."""
DEFAULT_MAX_INFLIGHT_PIXELS = 256_000_000
"""Decoded pixels one ingress replica holds at once: about 2 GB at ~8 bytes per pixel
(RGB array, mask, heatmap, PNG buffers); ten 24-megapixel dermoscopy images."""


@dataclass(frozen=True)
class AppConfig:
    """How the two deployments are built: checkpoints, batching, scaling and request limits.

    ``max_ongoing_requests``/``max_queued_requests`` bound the model deployment, where the
    compute is; a request beyond its queue gets 503. The ingress only decodes, validates and
    encodes PNGs, so its bounds are separate and larger. ``target_ongoing_requests`` defaults to
    one full batch per replica: the autoscaler adds a replica before requests start waiting
    for a second batch. ``torch_threads`` defaults to ``num_cpus`` because Ray pins replicas to
    ``OMP_NUM_THREADS=1``. ``api_keys``, when given, is forwarded to the ingress replicas as
    ``RAYSKY_API_KEYS``; ``None`` leaves the replicas' own environment in charge.
    ``access_log`` is an optional local file receiving the JSON access log, besides stderr.
    ``max_inflight_pixels`` bounds each ingress replica's decoded uploads in flight; uploads
    beyond it wait their turn (503 after 30 s).
    """

    segmenter: str
    classifier: str
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_S
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 128
    ingress_max_queued_requests: int = 512
    num_cpus: float = 1.0
    torch_threads: int | None = None
    use_gpu: bool = False
    precision: str = "fp32"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS
    api_keys: tuple[str, ...] | None = None
    access_log: str | None = None

    def __post_init__(self):
        if not self.segmenter or not self.classifier:
            raise ValueError("both a segmenter and a classifier checkpoint URI are required")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas} "
                             f"and {self.max_replicas}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        if self.max_ongoing_requests < self.max_batch_size:
            # Fewer in-flight requests than a batch would leave every batch partly empty.
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be at "
                             f"least max_batch_size ({self.max_batch_size})")
        if self.max_queued_requests == 0 or self.ingress_max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_body_bytes < 1 or self.max_pixels < 1 or self.max_inflight_pixels < 1:
            raise ValueError("max_body_bytes, max_pixels and max_inflight_pixels must be "
                             "positive")
        if self.num_cpus < 0 or self.ingress_replicas < 1:
            raise ValueError("num_cpus must be >= 0 and ingress_replicas >= 1")
        if isinstance(self.api_keys, str):
            raise ValueError("api_keys must be a list of keys, not one string")

    @property
    def threads(self) -> int:
        """Torch intra-op threads for each model replica."""
        return self.torch_threads or max(1, int(self.num_cpus))

    @property
    def target_ongoing(self) -> float:
        """Autoscaling target of in-flight requests per model replica."""
        return self.target_ongoing_requests or float(self.max_batch_size)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> AppConfig:
        """Build from application arguments; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown raysky serve argument(s) {unknown}; known: {sorted(known)}")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in args]
        if missing:
            raise ValueError(f"missing raysky serve argument(s) {missing}")
        args = dict(args)
        if args.get("api_keys") is not None:
            args["api_keys"] = tuple(args["api_keys"])
        return cls(**args)

    def to_app_args(self) -> dict[str, Any]:
        """The application-argument dict :func:`raysky.serve.app.build_app` accepts."""
        names = {f.name for f in fields(AppConfig)}
        return {k: v for k, v in asdict(self).items() if k in names}


@dataclass(frozen=True)
class ServeSettings(AppConfig):
    """An :class:`AppConfig` plus where Ray and the HTTP proxy run, for ``run_server``.

    ``ray_address`` is passed to ``ray.init`` when Ray is not yet initialised: ``"local"``
    starts a private instance, ``"auto"`` joins the running cluster. HTTP options only take
    effect when this call starts Serve; an already running Serve keeps its own.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "raysky"
    route_prefix: str = "/"
    ray_address: str = "local"

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
