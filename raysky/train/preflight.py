"""Checks before a training run starts: settings that cannot work, a run that cannot be resumed
as asked, and a cluster that would leave Ray Data no CPU. Each fails in seconds with a
:class:`~raysky.settings.ParameterError` naming the setting (the command line names its flag),
instead of minutes later inside a worker.
"""

from __future__ import annotations

from raysky import storage
from raysky.models import get_preset
from raysky.models.checkpoint import read_checkpoint_meta
from raysky.models.runtime import TRAIN_PRECISIONS
from raysky.settings import ParameterError
from raysky.train.loops import DEFAULT_METRIC
from raysky.train.settings import MASK_SOURCES, TrainSettings, check_run_name, hyperparameters


def validate_settings(settings: TrainSettings, kind: str) -> tuple[str, str]:
    """Check the settings before anything starts; returns ``(metric, mode)``, the kind's
    defaults where the settings leave them ``None``.

    ``settings`` has its recipe filled in (:func:`raysky.train.settings.with_recipe`).
    """
    get_preset(settings.preset)
    check_run_name(settings.name)
    for name in ("epochs", "batch_size", "workers", "num_to_keep"):
        if getattr(settings, name) < 1:
            raise ParameterError(name, getattr(settings, name), "must be at least 1")
    if settings.precision not in TRAIN_PRECISIONS:
        raise ParameterError("precision", settings.precision,
                             f"must be one of {', '.join(TRAIN_PRECISIONS)}")
    for name in ("lr", "encoder_lr_scale"):
        if not getattr(settings, name) > 0:
            raise ParameterError(name, getattr(settings, name), "must be positive")
    if not 0 <= settings.label_smoothing < 1:
        raise ParameterError("label_smoothing", settings.label_smoothing, "must be in [0, 1)")
    if settings.artefact_consistency < 0:
        raise ParameterError("artefact_consistency", settings.artefact_consistency,
                             "must be 0 (off) or positive")
    if settings.artefact_consistency > 0 and kind != "classifier":
        raise ParameterError("artefact_consistency", settings.artefact_consistency,
                             "applies to the classifier only; leave it unset or 0 for the segmenter")
    if settings.artefact_consistency > 0 and not get_preset(settings.preset).recipe(
            kind).augment.artefacts:
        raise ParameterError(
            "artefact_consistency", settings.artefact_consistency,
            f"needs a recipe that pastes artefacts (its clean twins are what the loss compares), "
            f"and the {settings.preset} preset's classifier recipe pastes none; set it to 0")
    metric, mode = DEFAULT_METRIC[kind]
    metric, mode = settings.metric or metric, settings.metric_mode or mode
    if mode not in ("max", "min"):
        raise ParameterError("metric_mode", mode, "must be max or min")
    if kind == "classifier":
        if settings.mask_source not in MASK_SOURCES:
            raise ParameterError("mask_source", settings.mask_source,
                                 f"must be one of {', '.join(MASK_SOURCES)}")
        if settings.mask_source == "segmenter" and not settings.segmenter:
            raise ParameterError(
                "segmenter", settings.segmenter, "the classifier's lesion masks need a segmenter "
                "checkpoint (or {mask_source} to train on the dataset's ground-truth masks)",
                mentions={"mask_source": "ground-truth"})
    return metric, mode


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
        raise ParameterError("name", settings.name, f"run {run_uri} exists and cannot be "
                             f"resumed: {'; '.join(problems)}; use a new name")
    recorded = meta.get("extra", {}).get("hyperparameters", {})
    changed = [f"{name} was {recorded[name]!r}, now {value!r}"
               for name, value in hyperparameters(settings).items()
               if name in recorded and recorded[name] != value]
    if changed and not settings.force_resume:
        raise ParameterError(
            "name", settings.name, f"run {run_uri} was trained with other settings: "
            f"{'; '.join(changed)}; resume with the same settings, continue anyway with "
            "{force_resume}, or use a new name", mentions={"force_resume": True})
    if changed:
        print(f"{kind}: force_resume: continuing {run_uri} although {'; '.join(changed)}",
              flush=True)
    if settings.pretrained_encoder != "none":
        print(f"{kind}: resuming {run_uri} from {checkpoints[-1].rsplit('/', 2)[-2]}: its "
              f"weights win over pretrained_encoder={settings.pretrained_encoder!r}", flush=True)


def check_cpus(settings: TrainSettings) -> None:
    """Ray Data decodes on CPUs the workers do not hold; with none left, training would hang.

    A cluster large enough whose CPUs are busy now (another job, a Serve deployment) only
    delays the run: Ray Train waits for them without a word, so this says so once.
    """
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    held = settings.workers * settings.cpus_per_worker
    if total - held >= 1:
        free = ray.available_resources().get("CPU", 0.0)
        if free - held < 1:
            print(f"warning: {free:g} of the Ray cluster's {total:g} CPUs are free now; this "
                  f"run needs {held + 1:g} ({settings.workers} worker(s) x "
                  f"{settings.cpus_per_worker:g} CPU, and 1 for Ray Data), so Ray Train waits "
                  "until other jobs, Serve deployments or actors release theirs (`ray status` "
                  "shows what holds them)", flush=True)
        return
    error = ParameterError(
        "workers", settings.workers, f"the Ray cluster has {total:g} CPUs and "
        f"{settings.workers} worker(s) x {settings.cpus_per_worker:g} CPU hold {held:g}, leaving "
        "none for Ray Data's decoding and augmentation; lower {workers} or {cpus_per_worker}",
        mentions={"workers": None, "cpus_per_worker": None})
    if len([node for node in ray.nodes() if node.get("Alive")]) <= 1:
        raise error
    # A multi-node cluster may be autoscaling; let it try, but say why it may wait.
    print(f"warning: {error}", flush=True)
