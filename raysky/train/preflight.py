"""Checks before a training run starts: settings that cannot work, a run that cannot be resumed
as asked, and a cluster that would leave Ray Data no CPU. Each fails in seconds with a message
naming the flag, instead of minutes later inside a worker.
"""

from __future__ import annotations

from raysky import storage
from raysky.models import get_preset
from raysky.models.checkpoint import read_checkpoint_meta
from raysky.models.runtime import TRAIN_PRECISIONS
from raysky.train.loops import DEFAULT_METRIC
from raysky.train.settings import MASK_SOURCES, TrainSettings, hyperparameters


def validate_settings(settings: TrainSettings, kind: str) -> tuple[str, str, str]:
    """Check the settings before anything starts; returns ``(precision, metric, mode)``.

    ``settings`` has its recipe filled in (:func:`raysky.train.settings.with_recipe`).
    """
    get_preset(settings.preset)
    if not settings.name or "/" in settings.name:
        raise ValueError(f"--name must be a non-empty name without '/', got {settings.name!r}")
    for flag, value in (("--epochs", settings.epochs), ("--batch-size", settings.batch_size),
                        ("--workers", settings.workers), ("--num-to-keep", settings.num_to_keep)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    precision = settings.precision
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}")
    for flag, value in (("--lr", settings.lr), ("--encoder-lr-scale", settings.encoder_lr_scale)):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not 0 <= settings.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {settings.label_smoothing}")
    metric, mode = DEFAULT_METRIC[kind]
    metric, mode = settings.metric or metric, settings.metric_mode or mode
    if mode not in ("max", "min"):
        raise ValueError(f"--metric-mode must be max or min, got {mode!r}")
    if kind == "classifier":
        if settings.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask source must be one of {', '.join(MASK_SOURCES)}, "
                             f"got {settings.mask_source!r}")
        if settings.mask_source == "segmenter" and not settings.segmenter:
            raise ValueError("--segmenter CKPT_URI is required (or --gt-masks to train on the "
                             "dataset's ground-truth masks)")
    return precision, metric, mode


def check_existing_run(run_uri: str, kind: str, settings: TrainSettings,
                        classes: tuple[str, ...]) -> None:
    """A resumed run must be the same model trained the same way; say so before Ray starts.

    A different kind, preset or class list is always refused. Different hyperparameters
    (learning rates, batch size, workers, epochs) are refused unless ``force_resume``, since
    the optimizer state and the learning-rate schedule were built for the old ones.
    """
    preset = settings.preset
    checkpoints = sorted(uri for uri in storage.list_files(run_uri, suffixes=(".json",))
                         if uri.endswith("/config.json") and "/checkpoint_" in uri)
    if not checkpoints:
        return
    meta = read_checkpoint_meta(checkpoints[-1].rsplit("/", 1)[0])
    problems = []
    if meta["kind"] != kind:
        problems.append(f"it holds a {meta['kind']}, not a {kind}")
    if meta.get("preset") != preset:
        problems.append(f"its preset is {meta.get('preset')}, not {preset}")
    if kind == "classifier" and tuple(meta.get("classes", ())) != tuple(classes):
        problems.append(f"its classes are {meta.get('classes')}, not {list(classes)}")
    if problems:
        raise ValueError(f"run {run_uri} exists and cannot be resumed: {'; '.join(problems)}. "
                         "Use a new --name.")
    recorded = meta.get("extra", {}).get("hyperparameters", {})
    changed = [f"{name} was {recorded[name]!r}, now {value!r}"
               for name, value in hyperparameters(settings).items()
               if name in recorded and recorded[name] != value]
    if changed and not settings.force_resume:
        raise ValueError(f"run {run_uri} was trained with other settings: {'; '.join(changed)}. "
                         "Resume with the same settings, pass --force-resume to continue "
                         "anyway, or use a new --name.")
    if changed:
        print(f"{kind}: --force-resume: continuing {run_uri} although {'; '.join(changed)}",
              flush=True)
    if settings.pretrained_encoder != "none":
        print(f"{kind}: resuming {run_uri} from {checkpoints[-1].rsplit('/', 2)[-2]}: its "
              f"weights win over --pretrained-encoder {settings.pretrained_encoder}", flush=True)


def check_cpus(settings: TrainSettings) -> None:
    """Ray Data decodes on CPUs the workers do not hold; with none left, training would hang."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = settings.workers * settings.cpus_per_worker
    if total - held >= 1:
        return
    message = (f"the Ray cluster has {total:g} CPUs and {settings.workers} worker(s) x "
               f"{settings.cpus_per_worker:g} CPU hold {held:g}, leaving none for Ray Data's "
               "decoding and augmentation; lower --workers or --cpus-per-worker")
    if len([node for node in ray.nodes() if node.get("Alive")]) <= 1:
        raise ValueError(message)
    # A multi-node cluster may be autoscaling; let it try, but say why it may wait.
    print(f"warning: {message}", flush=True)
