"""The settings of a training run and what it returns; plain data, no heavy imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from raysky import storage
from raysky.jsonable import to_jsonable
from raysky.models.config import MIN_INPUT_SIZE, get_preset, recipe_to_dict
from raysky.settings import ParameterError, setting

MASK_SOURCES = ("segmenter", "ground-truth")
"""Where the classifier's lesion masks come from."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise a ``ParameterError`` naming ``name``.

    The run lives at ``<storage>/<name>``, so the name must be one path component of safe
    characters (:func:`raysky.storage.name_problem`): ``..``, ``a/b`` or ``/abs`` would put the
    run, and everything it writes, somewhere else.
    """
    problem = storage.name_problem(name, nested=False)
    if problem:
        raise ParameterError("name", name, f"not a valid run name: it {problem}")
    return name


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training run needs; the CLI flags map one-to-one onto these fields.

    ``segmenter``, ``use_metadata``, ``use_lesion_stream`` and ``mask_source`` apply to the
    classifier only; the last two switches give the paper's ablations.
    ``metric`` / ``metric_mode`` choose the best checkpoint (default: Dice for the segmenter,
    balanced accuracy for the classifier, both maximised). Fields left ``None`` take the
    preset's :class:`~raysky.models.config.Recipe` for the model trained
    (:func:`with_recipe`), so ``epochs`` is the only knob a run needs.
    """

    data: str = setting(help="dataset root, a local folder or s3:// prefix")
    name: str = setting(
        help="run name; the run is <storage>/<name>, and running again with the same name "
        "resumes from its latest checkpoint")
    format: str = setting(
        "ham10000", help="dataset layout; a splits.csv at the root (image_id,split of "
        "train/val/test) fixes the validation split, and its test images are never trained on")
    preset: str = setting("lite", help="model sizes; see `raysky info`")
    epochs: int | None = setting(None, help="total epochs (default: the preset's recipe)")
    workers: int = setting(2, help="Ray Train workers, each with its own data shard")
    gpu: bool = setting(False, help="one GPU per worker: CUDA, bf16, channels_last")
    storage: str = setting(
        "runs", help="where runs live, a local folder or s3:// prefix")
    precision: str = setting(
        "auto", help="fp32, bf16 autocast, or auto: bf16 on GPUs, and on CPUs with bf16 "
        "instructions only when a measured step of this model is faster")
    # None: the preset's recipe for this model (raysky.models.config.Recipe)
    pretrained_encoder: str | None = setting(
        None, help="initial encoder weights: imagenet (a weight package, else timm's hub or "
        "cache; never a silent random start), none (random), or a timm state dict file or "
        "s3:// URI (.safetensors or .pth)")
    batch_size: int | None = setting(None, help="images per worker per step")
    lr: float | None = setting(None, help="peak AdamW learning rate of the new layers")
    encoder_lr_scale: float | None = setting(
        None, help="the encoders' learning rate as a fraction of the peak learning rate")
    weight_decay: float | None = setting(None, help="AdamW weight decay")
    label_smoothing: float | None = setting(None, help="label smoothing (classifier)")
    class_weight_power: float | None = setting(
        None, help="loss weight of each class is frequency**-power (classifier)")
    artefact_consistency: float | None = setting(
        None, help="weight of a loss asking the prediction on an image with a drawn artefact to "
        "agree with the same view without it (classifier; 0: off)")
    force_resume: bool = setting(
        False, help="resume a run even though lr, batch size, workers or epochs differ from "
        "the ones it was started with")
    val_fraction: float = setting(
        0.15, help="validation share when there is no splits.csv; split by lesion_id")
    seed: int = setting(0, help="split and init seed")
    num_to_keep: int = setting(
        2, help="checkpoints kept, best by the metric plus the latest")
    metric: str | None = setting(
        None, help="validation metric that picks the best checkpoint (default: dice for the "
        "segmenter, balanced_accuracy for the classifier)")
    metric_mode: str | None = setting(
        None, help="whether the metric is maximised (max) or minimised (default: max)")
    max_failures: int = setting(
        2, help="worker failures to recover from the last checkpoint; -1 = unlimited")
    cpus_per_worker: float = setting(1, help="CPUs reserved per worker")
    threads_per_worker: int | None = setting(
        None, help="torch threads per worker (default: the CPUs per worker); more than the "
        "CPUs held lets a worker use cores that Ray Data's decoding leaves idle")
    progress_interval: float = 10.0
    mlflow: str | None = setting(
        None, help="track the run in MLflow at this URI: a tracking server, a sqlite:/// "
        "store or a local folder")
    mlflow_experiment: str = setting("raysky", help="MLflow experiment the run is logged in")
    # classifier only
    segmenter: str | None = setting(
        None, help="segmenter checkpoint whose masks feed the lesion stream")
    use_metadata: bool = True
    use_lesion_stream: bool = True
    lesion_branch: str | None = setting(
        None, help="the lesion view: encoder (a second encoder on the background-suppressed "
        "image, the paper) or shared (the full image's feature map pooled with the mask); "
        "default: the preset's")
    inference_size: int | None = setting(
        None, help="the side in px that scoring, serving and calibration run the classifier at "
        "(FixRes: a little larger than it trains at); default: the preset's")
    mask_source: str = "segmenter"

    def __post_init__(self) -> None:
        check_run_name(self.name)
        if self.inference_size is not None and self.inference_size < MIN_INPUT_SIZE:
            raise ParameterError("inference_size", self.inference_size,
                                 f"must be at least {MIN_INPUT_SIZE}, the encoder's downsampling")

    @property
    def worker_threads(self) -> int:
        """Torch threads per worker: ``threads_per_worker``, else the CPUs each worker holds."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))


RECIPE_FIELDS = ("pretrained_encoder", "epochs", "batch_size", "lr", "encoder_lr_scale", "weight_decay",
                 "label_smoothing", "class_weight_power", "artefact_consistency")
RESUME_FIELDS = ("lr", "encoder_lr_scale", "weight_decay", "batch_size", "workers", "epochs",
                 "label_smoothing", "class_weight_power", "artefact_consistency")
"""Hyperparameters a resumed run must share with the run it continues (or ``force_resume``)."""


def with_recipe(settings: TrainSettings, kind: str) -> TrainSettings:
    """``settings`` with every ``None`` recipe field filled from the preset's recipe for ``kind``."""
    recipe = get_preset(settings.preset).recipe(kind)
    filled = {name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(settings, name) is None}
    return replace(settings, **filled)


def resolved_recipe(settings: TrainSettings, kind: str) -> dict[str, Any]:
    """The preset's recipe for ``kind`` with this run's overrides, as a JSON-ready dict."""
    recipe = get_preset(settings.preset).recipe(kind)
    overrides = {name: getattr(settings, name) for name in RECIPE_FIELDS
                 if getattr(settings, name) is not None}
    return recipe_to_dict(replace(recipe, **overrides))


def hyperparameters(settings: TrainSettings) -> dict[str, Any]:
    """The values of :data:`RESUME_FIELDS`, as recorded in every checkpoint of the run."""
    return {name: getattr(settings, name) for name in RESUME_FIELDS}


@dataclass
class TrainResult:
    """Where a finished run is, its best checkpoint, and that checkpoint's metrics."""

    run_uri: str
    best_checkpoint_uri: str | None
    metrics: dict[str, Any]
    latest_checkpoint_uri: str | None = None
    history: list[dict] = field(default_factory=list)
    result_uri: str | None = None
    # classifier runs: the best checkpoint calibrated on the val split, None when skipped
    calibrated_checkpoint_uri: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready form (NaN metrics become null)."""
        return to_jsonable(asdict(self))


@dataclass(frozen=True)
class LoopConfig:
    """What :func:`raysky.train.loops.train_loop_per_worker` needs on every worker: the run's
    :class:`TrainSettings` as they are, plus only what the driver derives from them and the data.

    Ray Train ships it to the workers as a plain dict (:meth:`to_dict`), and each worker
    rebuilds it (:meth:`from_dict`). Build one with :meth:`from_settings`, which fills the
    recipe fields the settings leave ``None``; the throughput benchmarks build theirs that way
    too, and the defaults below serve their plain loop.
    """

    kind: str
    settings: TrainSettings  # validated, recipe fields filled (with_recipe)
    # the validation metric that picks the best checkpoint, and whether it is maximised
    metric: str = "val_loss"
    metric_mode: str = "min"
    classes: list[str] = field(default_factory=list)
    vocab: dict | None = None
    class_weights: list[float] | None = None
    train_rows: int = 0
    # the preset's Recipe with this run's overrides (raysky.models.config.recipe_to_dict):
    # augmentation, moving average, frozen layers, metadata dropout
    recipe: dict[str, Any] = field(default_factory=dict)
    # the settings as every checkpoint records them (``extra.settings``) and MLflow logs them:
    # the fields, the resolved precision and metric, the split and the masks' source
    record: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    # the MLflow run rank 0 logs to (raysky.train.tracking.TrackingTarget), None: untracked
    tracking: dict[str, str] | None = None

    @classmethod
    def from_settings(cls, kind: str, settings: TrainSettings, **derived: Any) -> LoopConfig:
        """The config of a ``kind`` run with ``settings``, their ``None`` recipe fields filled
        from the preset's recipe (and ``recipe`` too, unless ``derived`` gives it)."""
        derived.setdefault("recipe", resolved_recipe(settings, kind))
        return cls(kind=kind, settings=with_recipe(settings, kind), **derived)

    @property
    def threads(self) -> int:
        """Torch threads per worker (:attr:`TrainSettings.worker_threads`)."""
        return self.settings.worker_threads

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """What a resumed run must share with this one (:func:`hyperparameters`)."""
        return hyperparameters(self.settings)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict Ray Train passes to each worker as its ``train_loop_config``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopConfig:
        """The config :meth:`to_dict` gave, rebuilt on a worker."""
        return cls(**{**data, "settings": TrainSettings(**data["settings"])})
