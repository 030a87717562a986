"""The settings of a training run and what it returns; plain data, no heavy imports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from raysky import storage
from raysky.jsonable import to_jsonable

MASK_SOURCES = ("segmenter", "ground-truth")
"""Where the classifier's lesion masks come from."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise ``ValueError`` naming ``--name``.

    The run lives at ``<storage>/<name>``, so the name must be one path component of safe
    characters (:func:`raysky.storage.name_problem`): ``..``, ``a/b`` or ``/abs`` would put the
    run, and everything it writes, somewhere else.
    """
    problem = storage.name_problem(name, nested=False)
    if problem:
        raise ValueError(f"--name {name!r} is not a valid run name: it {problem}")
    return name


@dataclass
class TrainSettings:
    """Everything one training run needs; the CLI flags map one-to-one onto these fields.

    ``segmenter``, ``use_metadata``, ``use_lesion_stream`` and ``mask_source`` apply to the
    classifier only; the last two switches give the paper's ablations.
    ``metric`` / ``metric_mode`` choose the best checkpoint (default: Dice for the segmenter,
    balanced accuracy for the classifier, both maximised). Fields left ``None`` take the
    preset's :class:`~raysky.models.config.Recipe` for the model trained
    (:func:`with_recipe`), so ``epochs`` is the only knob a run needs.
    """

    data: str
    name: str
    format: str = "ham10000"
    preset: str = "lite"
    epochs: int = 10
    workers: int = 2
    gpu: bool = False
    storage: str = "runs"
    precision: str = "auto"
    # None: the preset's recipe for this model (raysky.models.config.Recipe)
    pretrained_encoder: str | None = None
    batch_size: int | None = None
    lr: float | None = None
    encoder_lr_scale: float | None = None
    weight_decay: float | None = None
    label_smoothing: float | None = None
    class_weight_power: float | None = None
    force_resume: bool = False
    val_fraction: float = 0.15
    seed: int = 0
    num_to_keep: int = 2
    metric: str | None = None
    metric_mode: str | None = None
    max_failures: int = 2
    cpus_per_worker: float = 1
    threads_per_worker: int | None = None  # default: cpus_per_worker
    progress_interval: float = 10.0
    # classifier only
    segmenter: str | None = None
    use_metadata: bool = True
    use_lesion_stream: bool = True
    mask_source: str = "segmenter"

    def __post_init__(self) -> None:
        check_run_name(self.name)


RECIPE_FIELDS = ("pretrained_encoder", "batch_size", "lr", "encoder_lr_scale", "weight_decay",
                 "label_smoothing", "class_weight_power")
RESUME_FIELDS = ("lr", "encoder_lr_scale", "weight_decay", "batch_size", "workers", "epochs",
                 "label_smoothing", "class_weight_power")
"""Hyperparameters a resumed run must share with the run it continues (or --force-resume)."""


def with_recipe(settings: TrainSettings, kind: str) -> TrainSettings:
    """``settings`` with every ``None`` recipe field filled from the preset's recipe for ``kind``."""
    from dataclasses import replace

    from raysky.models.config import get_preset

    recipe = get_preset(settings.preset).recipe(kind)
    filled = {name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(settings, name) is None}
    return replace(settings, **filled)


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


@dataclass
class LoopConfig:
    """What :func:`raysky.train.loops.train_loop_per_worker` needs on every worker.

    The driver builds it from :class:`TrainSettings`, the preset's recipe and the data (the
    classes, the metadata vocabulary, the class weights, the split's size); Ray Train ships
    it to the workers as a plain dict (:meth:`to_dict`), and each worker rebuilds it. The
    defaults serve the throughput benchmark's plain loop, which builds one by hand.
    """

    kind: str
    preset: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    encoder_lr_scale: float = 1.0
    label_smoothing: float = 0.0
    classes: list[str] = field(default_factory=list)
    vocab: dict | None = None
    class_weights: list[float] | None = None
    use_metadata: bool = True
    use_lesion_stream: bool = True
    precision: str = "fp32"
    use_gpu: bool = False
    threads: int = 1
    seed: int = 0
    train_rows: int = 0
    pretrained_encoder: str | None = None
    metric: str = "val_loss"
    metric_mode: str = "min"
    run_name: str = ""
    progress_interval: float = 10.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict Ray Train passes to each worker as its ``train_loop_config``."""
        from dataclasses import asdict

        return asdict(self)
