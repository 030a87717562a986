"""Settings of the live endpoint: what the application is built from, and where it listens.

:class:`AppConfig` is exactly what ``build_app`` takes as application arguments (the ``args:``
block of ``infra/serve/raysky.yaml``); :class:`ServeSettings` adds what only a process that
starts Serve itself needs (Ray address, host, port, application name).
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from raysky.data.images import DEFAULT_MAX_PIXELS
from raysky.models.runtime import PRECISIONS
from raysky.settings import HELP, TTA_HELP, setting

DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
"""Largest accepted request body (20 MiB): a full-resolution dermoscopy JPEG is a few MB."""
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_S = 0.002
"""How long an idle model waits for a batch to fill; requests queued behind a busy model
merge into its next batch regardless (see :mod:`raysky.serve.batching`)."""
DEFAULT_MAX_INFLIGHT_PIXELS = 256_000_000
"""Decoded pixels of 8-bit RGB one ingress replica holds at once: about 2.5 GB at the ~10 bytes
per pixel decoding takes; ten 24-megapixel dermoscopy images. Uploads with alpha or a palette
count double (see :data:`raysky.data.images.DECODE_BYTES_PER_PIXEL`)."""
MODEL_REPLICA_BASE_BYTES = 1536 * 2**20
"""Memory of an idle model replica: Ray, torch and the paper preset's models (1.4 GiB peak
measured)."""
MODEL_BYTES_PER_BATCH_ITEM = 384 * 2**20
"""Memory one more image in a batch adds to a model replica: its Grad-CAM activations at the
paper's input sizes and its full-resolution RGB input, mask and heatmap (about 18 bytes per
pixel, measured at 16 MP) for a 12-megapixel upload."""


@dataclass(frozen=True)
class AppConfig:
    """How the two deployments are built: checkpoints, batching, scaling and request limits.

    ``max_ongoing_requests``/``max_queued_requests`` bound the model deployment, where the
    compute is; a request beyond its queue gets 503. The ingress only decodes, validates and
    encodes PNGs, so its bounds are separate and larger. ``target_ongoing_requests`` defaults to
    one full batch per replica: the autoscaler adds a replica before requests start waiting
    for a second batch. ``torch_threads`` defaults to ``num_cpus`` because Ray pins replicas to
    ``OMP_NUM_THREADS=1``. ``model_memory_mb`` is the memory Ray reserves per model replica
    (default: :attr:`model_memory_bytes`, which grows with ``max_batch_size``).

    Authentication (see :mod:`raysky.serve.security`): ``api_keys`` is for Python callers only
    (``run_server``; a Serve config must not hold keys, so :meth:`from_dict` refuses it): the
    keys are checked here and only their digests reach the replicas. Otherwise each ingress
    replica reads the keys of its node from ``api_keys_file``, ``RAYSKY_API_KEYS_FILE`` or
    ``RAYSKY_API_KEYS``. Without any key the app refuses to start unless
    ``allow_unauthenticated`` is set. ``enable_docs`` serves ``/docs`` and ``/openapi.json``.
    ``access_log`` is an optional local file receiving the JSON access log, besides stderr.
    ``max_inflight_pixels`` bounds each ingress replica's decoded uploads in flight, in pixels
    of 8-bit RGB; uploads beyond it wait their turn (503 after 30 s).
    """

    segmenter: str = setting(help="segmenter checkpoint directory or s3:// prefix")
    classifier: str = setting(help="classifier checkpoint directory or s3:// prefix")
    min_replicas: int = setting(1, help="model replicas kept running when idle")
    max_replicas: int = setting(1, help="model replicas the autoscaler may grow to")
    target_ongoing_requests: float | None = setting(
        None, help="autoscaling target of in-flight requests per model replica (default: the "
        "max batch size)")
    max_batch_size: int = setting(DEFAULT_MAX_BATCH_SIZE,
                                  help="largest batch a model replica scores at once")
    batch_wait_timeout_s: float = setting(
        DEFAULT_BATCH_WAIT_S, help="how long an idle model waits for a batch to fill; requests "
        "queued behind a busy model join its next batch anyway")
    max_ongoing_requests: int = setting(
        16, help="in-flight requests per model replica (at least the max batch size)")
    max_queued_requests: int = setting(
        64, help="requests queued for the model beyond that; more get 503")
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = 128
    ingress_max_queued_requests: int = 512
    num_cpus: float = setting(1.0, help="CPUs reserved per model replica")
    torch_threads: int | None = setting(
        None, help="torch threads per model replica (default: the CPUs reserved)")
    use_gpu: bool = setting(False, help="give each model replica one GPU")
    precision: str = setting("fp32", help="inference precision")
    tta: bool = setting(False, help=TTA_HELP)
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES,
                                  help="largest request body; larger bodies get 413")
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="largest image (width x height) decoded; larger images get 413")
    max_inflight_pixels: int = setting(
        DEFAULT_MAX_INFLIGHT_PIXELS, help="decoded pixels an ingress replica holds at once; "
        "uploads beyond it wait their turn, and get 503 after 30 s")
    api_keys: tuple[str, ...] | None = None
    api_keys_file: str | None = setting(
        None, help="file holding the accepted API keys, one per line (keep it mode 0600); "
        "default: RAYSKY_API_KEYS_FILE, else RAYSKY_API_KEYS")
    allow_unauthenticated: bool = setting(
        False, help="serve without API keys: anyone who can reach the port can use it")
    enable_docs: bool = setting(
        False, help="serve the OpenAPI schema and docs at /openapi.json and /docs")
    model_memory_mb: float | None = None
    access_log: str | None = setting(
        None, help="also append the JSON access log to this local file")

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
        if self.api_keys is not None and self.api_keys_file:
            raise ValueError("give api_keys or api_keys_file, not both")
        if self.model_memory_mb is not None and self.model_memory_mb <= 0:
            raise ValueError(f"model_memory_mb must be positive, got {self.model_memory_mb}")

    @property
    def threads(self) -> int:
        """Torch intra-op threads for each model replica."""
        return self.torch_threads or max(1, int(self.num_cpus))

    @property
    def model_memory_bytes(self) -> int:
        """Memory Ray reserves for each model replica: ``model_memory_mb`` if set, else an idle
        replica plus one image's worth per place in a batch."""
        if self.model_memory_mb is not None:
            return int(self.model_memory_mb * 2**20)
        return MODEL_REPLICA_BASE_BYTES + self.max_batch_size * MODEL_BYTES_PER_BATCH_ITEM

    @property
    def target_ongoing(self) -> float:
        """Autoscaling target of in-flight requests per model replica."""
        return self.target_ongoing_requests or float(self.max_batch_size)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> AppConfig:
        """Build from application arguments, typed by :data:`AppArgs` (``"4"`` is 4, ``"false"``
        False); unknown, missing and ill-typed arguments are a ``ValueError`` naming them, and
        so are API keys, which Serve would show in plain text with the rest of its config."""
        return AppArgs.model_validate(args).to_config()

    def to_app_args(self) -> dict[str, Any]:
        """The application-argument dict :func:`raysky.serve.app.build_app` accepts (without
        ``api_keys``, which never goes into application arguments)."""
        names = {f.name for f in fields(AppConfig)} - NOT_APP_ARGS
        return {k: v for k, v in asdict(self).items() if k in names}


NOT_APP_ARGS = frozenset({"api_keys"})
"""AppConfig fields that are never application arguments: Serve shows those in plain text."""


class _AppArgsBase(BaseModel):
    """What every typed application-argument model shares: no unknown arguments, no keys."""

    # hide_input_in_errors: an error must not echo what it was given, which could be a key.
    model_config = ConfigDict(extra="forbid", frozen=True, title="raysky serve arguments",
                              hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _known_arguments_only(cls, args: Any) -> Any:
        # Before the fields: the message lists what is known, which pydantic's own
        # "extra inputs are not permitted" would not.
        if isinstance(args, dict):
            if "api_keys" in args:
                raise ValueError(
                    "api_keys cannot be given in a Serve config or as an application argument "
                    "(the dashboard shows them in plain text): put the keys in a file named by "
                    "api_keys_file or in RAYSKY_API_KEYS on the nodes")
            unknown = sorted(set(args) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown raysky serve argument(s) {unknown}; known: "
                                 f"{sorted(cls.model_fields)}")
            missing = [name for name, spec in cls.model_fields.items()
                       if spec.is_required() and name not in args]
            if missing:
                raise ValueError(f"missing raysky serve argument(s) {missing}")
        return args

    def to_config(self) -> AppConfig:
        """The :class:`AppConfig` these arguments describe (its own checks run here)."""
        return AppConfig(**self.model_dump())


def _app_args_model() -> type[_AppArgsBase]:
    """The pydantic model of :class:`AppConfig`'s application arguments, field for field.

    Generated from the dataclass so the two cannot drift: same names, types, defaults and help.
    """
    hints = typing.get_type_hints(AppConfig)
    definitions: dict[str, Any] = {}
    for f in fields(AppConfig):
        if f.name in NOT_APP_ARGS:
            continue
        default = ... if f.default is MISSING else f.default
        definitions[f.name] = (hints[f.name], Field(default, description=f.metadata.get(HELP)))
    return create_model("AppArgs", __base__=_AppArgsBase, __module__=__name__, **definitions)


AppArgs = _app_args_model()
"""The typed application arguments of :func:`raysky.serve.app.build_app`.

``serve run raysky.serve.app:build_app max_replicas=4 use_gpu=false`` hands the builder
strings; Serve validates them against this model first (its typed application builder), so
``"false"`` is False and ``"4"`` is 4, and ``max_replicas=four`` or an unknown argument fails
with the argument's name and the type it needs, before any Ray actor starts. A Serve config's
``args:`` block goes through the same model.
"""


@dataclass(frozen=True)
class ServeSettings(AppConfig):
    """An :class:`AppConfig` plus where Ray and the HTTP proxy run, for ``run_server``.

    ``ray_address`` is passed to ``ray.init`` when Ray is not yet initialised: ``"local"``
    starts a private instance, ``"auto"`` joins the running cluster. HTTP options only take
    effect when this call starts Serve; an already running Serve keeps its own.
    """

    host: str = setting(
        "127.0.0.1", help="address to bind; 0.0.0.0 exposes the endpoint to the network")
    port: int = setting(8000, help="HTTP port")
    app_name: str = "raysky"
    route_prefix: str = "/"
    ray_address: str = setting(
        "local", help="Ray address: 'local' starts a private Ray, 'auto' joins the running "
        "cluster")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
