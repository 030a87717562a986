"""Driver side of training: data, splits, masks, the TorchTrainer, and the run summary.

``train_segmenter`` and ``train_classifier`` are the plain Python API that the CLI, the
``jobs/`` entrypoints and the end-to-end demo all call. A run lives at
``<storage>/<name>/`` (a local folder or an ``s3://`` prefix) and holds Ray Train's
checkpoint directories (``checkpoint_epoch_NNNN/``, each a raysky checkpoint), the classifier's
segmenter masks, ``result.json`` with the best checkpoint and its metrics, and for the classifier
``calibrated/``: the best checkpoint calibrated on the val split (``calibrated_checkpoint_uri``;
skipped, with the reason printed, when the val split holds under 20 malignant or 20 benign
images). Running again with the same storage and name resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

from raysky import storage
from raysky.cluster import ensure_ray
from raysky.data.metadata import MetadataVocab
from raysky.data.readers import class_counts
from raysky.data.records import LesionRecord
from raysky.data.taxonomy import order_classes
from raysky.jsonable import to_jsonable
from raysky.models import get_preset
from raysky.models.checkpoint import read_checkpoint_meta
from raysky.settings import ParameterError
from raysky.train.datasets import (
    build_dataset,
    cache_side,
    class_weights,
    encode_rows,
    load_splits,
)
from raysky.train.loops import (
    HISTORY_FILE,
    SCHEDULE,
    train_loop_per_worker,
)
from raysky.train.preflight import check_cpus, check_existing_run, validate_settings
from raysky.train.settings import (
    LoopConfig,
    TrainResult,
    TrainSettings,
    resolved_recipe,
    with_recipe,
)
from raysky.train.tracking import finish_run, start_tracking

RESULT_FILE = "result.json"


def _storage_root(uri: str) -> str:
    uri = str(uri)
    return uri.rstrip("/") if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _checkpoint_uri(checkpoint, root: str) -> str | None:
    """A Ray checkpoint's location as a URI raysky's storage layer (and the user) can open."""
    if checkpoint is None:
        return None
    return f"s3://{checkpoint.path}" if storage.is_s3(root) else checkpoint.path


def training_data(settings: TrainSettings, kind: str, train: list[LesionRecord],
                  val: list[LesionRecord], split_how: str) -> dict[str, Any]:
    """What a run trained on, for its model card: the data, the split (with the sha256 of a
    split file, and of the assignment itself so a derived split is identified too) and the
    images per class on each side (per mask presence for a segmenter)."""
    import hashlib

    def counts(records: list[LesionRecord]) -> dict[str, int]:
        if kind == "segmenter":
            return {"with_mask": sum(r.mask_uri is not None for r in records)}
        return class_counts(records)

    split_sha256 = None
    if storage.is_s3(split_how) or os.path.isfile(split_how):
        split_sha256 = hashlib.sha256(storage.read_bytes(split_how)).hexdigest()
    # Sorted "image_id,side" lines: the same split gives the same hash whatever the file's
    # row order, and a split_by_lesion split (no file to hash) is still pinned down.
    assignment = sorted([f"{r.image_id},train" for r in train] + [f"{r.image_id},val" for r in val])
    return {"data": str(settings.data), "format": settings.format, "split": split_how,
            "split_sha256": split_sha256,
            "split_ids_sha256": hashlib.sha256("\n".join(assignment).encode()).hexdigest(),
            "train_images": len(train), "val_images": len(val),
            "train_classes": counts(train), "val_classes": counts(val)}


def _classes_and_weights(kind: str, settings: TrainSettings, train: list[LesionRecord],
                         val: list[LesionRecord]) -> tuple[tuple[str, ...], list[float] | None]:
    """The classifier's classes (from the training labels) and loss weights; none for the
    segmenter. Refuses a split that cannot train or evaluate a classifier."""
    if kind != "classifier":
        return (), None
    classes = order_classes({r.label for r in train})
    if len(classes) < 2:
        raise ValueError(f"{settings.data}: the training labels hold {len(classes)} class(es); "
                         "a classifier needs at least 2")
    unseen = sorted({r.label for r in val} - set(classes))
    if unseen:
        raise ValueError(f"validation labels {unseen} never occur in training; the split "
                         "cannot evaluate them")
    index = {c: i for i, c in enumerate(classes)}
    return classes, class_weights([index[r.label] for r in train], len(classes),
                                  power=settings.class_weight_power)


def _check_rows_per_worker(settings: TrainSettings, train_rows: int) -> None:
    """Every worker's shard must hold a whole batch: steps drop the last partial batch, so a
    smaller shard would train on nothing."""
    rows_per_worker = train_rows // settings.workers
    if rows_per_worker < settings.batch_size:
        raise ParameterError(
            "batch_size", settings.batch_size, f"{train_rows} training images over "
            f"{settings.workers} worker(s) leave {rows_per_worker} per worker, fewer than one "
            "batch; lower {batch_size} or {workers}",
            mentions={"batch_size": None, "workers": None})


def _datasets(kind: str, train: list[LesionRecord], val: list[LesionRecord],
              classes: tuple[str, ...], vocab: MetadataVocab, size: int, seed: int):
    """Both sets decoded once, into a uint8 cache a fifth larger than the model's input; every
    epoch augments the cached pixels in the workers (raysky.train.augment)."""
    started = time.monotonic()
    train_ds = build_dataset(encode_rows(train, classes, vocab), cache_side(size), train=True,
                             seed=seed)
    val_ds = build_dataset(encode_rows(val, classes, vocab), cache_side(size), train=False)
    print(f"{kind}: decoded {len(train) + len(val)} images into the {cache_side(size)} px "
          f"cache in {time.monotonic() - started:.0f} s", flush=True)
    return train_ds, val_ds


def _loop_config(kind: str, settings: TrainSettings, checked: tuple[str, str],
                 train: list[LesionRecord], val: list[LesionRecord], split_how: str,
                 classes: tuple[str, ...], weights: list[float] | None, vocab: MetadataVocab,
                 tracking, extra_summary: dict | None) -> LoopConfig:
    """What every worker's loop needs: the settings, with what the driver derived from them and
    the data (``checked`` is :func:`validate_settings`'s metric and mode), the
    resolved recipe and the provenance that the checkpoints and model cards record."""
    metric, mode = checked
    record = {**asdict(settings), "metric": metric, "metric_mode": mode,
              "split": split_how, **(extra_summary or {})}
    recipe = resolved_recipe(settings, kind)
    provenance = {"training_data": training_data(settings, kind, train, val, split_how),
                  "schedule": SCHEDULE, "augmentation": to_jsonable(recipe["augment"]),
                  "recipe": to_jsonable(recipe)}
    return LoopConfig.from_settings(
        kind, settings, metric=metric, metric_mode=mode, classes=list(classes),
        vocab=vocab.to_dict(), class_weights=weights, train_rows=len(train), recipe=recipe,
        record=to_jsonable(record), provenance=provenance,
        tracking=tracking and tracking.to_dict())


def _trainer(settings: TrainSettings, loop_config: LoopConfig, root: str, datasets: dict):
    """Ray Train's TorchTrainer for this run: one worker per ``settings.workers``, checkpoints
    kept by the run's metric, under ``root``."""
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    if storage.is_s3(root):
        # Ray resolves a bare s3:// URI with its own defaults; passing raysky's filesystem
        # keeps the endpoint (MinIO, moto) and region that every other raysky I/O uses.
        storage_kwargs = {"storage_path": root[len("s3://"):],
                          "storage_filesystem": storage.s3_filesystem()}
    else:
        storage_kwargs = {"storage_path": root}
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config.to_dict(),
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=settings.name,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep,
                                               checkpoint_score_attribute=loop_config.metric,
                                               checkpoint_score_order=loop_config.metric_mode),
            # Ray Train's per-report INFO lines would bury raysky's own progress, and its print
            # patch echoes every worker print twice (once through stdout, once through its
            # logger); raysky's lines are the output users read.
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            **storage_kwargs,
        ),
        datasets=datasets,
        # Validation is not split: rank 0 scores all of it, so no image is dropped to even
        # out shards and AUCs are computed over the whole set.
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def _run(kind: str, settings: TrainSettings, checked: tuple[str, str],
         train: list[LesionRecord], val: list[LesionRecord], split_how: str,
         extra_summary: dict | None = None) -> TrainResult:
    """Check the run against the data and the cluster, decode, train on Ray Train, summarise
    and (for a classifier) calibrate. ``checked`` is what :func:`validate_settings` returned
    for ``settings``, before any data was read."""
    preset = get_preset(settings.preset)
    size = (preset.segmenter if kind == "segmenter" else preset.classifier).input_size
    root = _storage_root(settings.storage)
    run_uri = storage.join(root, settings.name)
    vocab = MetadataVocab()
    classes, weights = _classes_and_weights(kind, settings, train, val)
    check_existing_run(run_uri, kind, settings, classes)
    _check_rows_per_worker(settings, len(train))

    tracking = start_tracking(settings, kind, run_uri)
    ensure_ray(log_to_driver=True)
    check_cpus(settings)
    train_ds, val_ds = _datasets(kind, train, val, classes, vocab, size, settings.seed)
    loop_config = _loop_config(kind, settings, checked, train, val, split_how, classes, weights,
                               vocab, tracking, extra_summary)
    trainer = _trainer(settings, loop_config, root, {"train": train_ds, "val": val_ds})
    print(f"{kind}: {len(train)} training / {len(val)} validation images ({split_how}); "
          f"{settings.workers} worker(s), preset {settings.preset}, {settings.precision}; "
          f"run {run_uri}", flush=True)
    if classes:
        print(f"{kind}: classes {list(classes)}, training counts {class_counts(train)}, loss "
              f"weights {[round(w, 3) for w in weights]}", flush=True)
    summary = None
    try:
        result = trainer.fit()
        summary = _summarise(result, run_uri, root, loop_config.metric, loop_config.metric_mode)
        if kind == "classifier":
            summary.calibrated_checkpoint_uri = _calibrate_best(summary, val, settings)
            storage.write_bytes(summary.result_uri, json.dumps(summary.to_dict(), indent=2).encode())
    finally:
        finish_run(tracking, summary)
    return summary


CALIBRATED_DIR = "calibrated"
"""The run's calibrated version of its best classifier checkpoint: ``<run>/calibrated``."""


def _calibrate_best(summary: TrainResult, val: list[LesionRecord],
                    settings: TrainSettings) -> str | None:
    """Calibrate the best checkpoint on the val split and write it to ``<run>/calibrated``.

    The val records carry the masks the run validated with (the segmenter's, or ground
    truth). Too small a val split skips calibration with a printed reason, not an error: the
    weights are fine, and ``raysky calibrate`` can calibrate them later on more data.
    """
    from raysky.calibration import NotEnoughCalibrationData
    from raysky.calibration.fit import describe_calibration
    from raysky.train.calibrate import calibrate_checkpoint

    if summary.best_checkpoint_uri is None:
        print("classifier: calibration skipped: the run reported no best checkpoint", flush=True)
        return None
    target = storage.join(summary.run_uri, CALIBRATED_DIR)
    try:
        meta = calibrate_checkpoint(summary.best_checkpoint_uri, val, target,
                                    {"data": str(settings.data), "format": settings.format,
                                     "split": "val"}, use_gpu=settings.gpu)
    except NotEnoughCalibrationData as exc:
        print(f"classifier: calibration skipped: {exc} (run raysky calibrate on more labelled "
              "data)", flush=True)
        return None
    print(f"classifier: {describe_calibration(meta['calibration'])}; written to {target}",
          flush=True)
    return target


def _summarise(result, run_uri: str, root: str, metric: str, mode: str) -> TrainResult:
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    best_metrics: dict = {}
    for checkpoint, metrics in result.best_checkpoints or []:
        if best is not None and checkpoint.path == best.path:
            best_metrics = dict(metrics)
    latest_uri = _checkpoint_uri(result.checkpoint, root)
    history: list[dict] = []
    if latest_uri:
        history = json.loads(storage.read_bytes(storage.join(latest_uri, HISTORY_FILE)))
    out = TrainResult(run_uri=run_uri, best_checkpoint_uri=_checkpoint_uri(best, root),
                      metrics=best_metrics, latest_checkpoint_uri=latest_uri, history=history,
                      result_uri=storage.join(run_uri, RESULT_FILE))
    storage.write_bytes(out.result_uri, json.dumps(out.to_dict(), indent=2).encode())
    return out


def train_segmenter(settings: TrainSettings) -> TrainResult:
    """Train (or resume) the Deep-UNet segmenter on the dataset's ground-truth masks."""
    settings = with_recipe(settings, "segmenter")
    checked = validate_settings(settings, "segmenter")
    train, val, how = load_splits(settings.data, settings.format, settings.val_fraction, settings.seed)
    train, val = [r for r in train if r.mask_uri], [r for r in val if r.mask_uri]
    if not train or not val:
        raise ValueError(f"{settings.data}: the segmenter needs ground-truth masks, found "
                         f"{len(train)} training and {len(val)} validation images with one")
    return _run("segmenter", settings, checked, train, val, how)


def train_classifier(settings: TrainSettings) -> TrainResult:
    """Train (or resume) the dual-stream classifier.

    The lesion stream's masks come from ``settings.segmenter`` (computed by a Ray Data job over
    the training and validation images), or from the dataset's ground truth with
    ``mask_source="ground-truth"``.
    """
    settings = with_recipe(settings, "classifier")
    checked = validate_settings(settings, "classifier")
    train, val, how = load_splits(settings.data, settings.format, settings.val_fraction, settings.seed)
    train, val = [r for r in train if r.label], [r for r in val if r.label]
    extra: dict[str, Any] = {"mask_source": settings.mask_source}
    if settings.mask_source == "segmenter":
        from raysky.train.masks import segmenter_masks

        meta = read_checkpoint_meta(settings.segmenter, "segmenter")
        ensure_ray(log_to_driver=True)
        mask_uri = storage.join(_storage_root(settings.storage), settings.name, "masks", meta["version"])
        started = time.monotonic()
        masked, errors = segmenter_masks(train + val, settings.segmenter, mask_uri,
                                         actors=max(1, settings.workers),
                                         cpus_per_actor=settings.cpus_per_worker,
                                         threads=settings.worker_threads,
                                         use_gpu=settings.gpu)
        by_id = {r.image_id: r for r in masked}
        train = [by_id[r.image_id] for r in train if r.image_id in by_id]
        val = [by_id[r.image_id] for r in val if r.image_id in by_id]
        print(f"classifier: segmenter {meta['version']} masks at {mask_uri} "
              f"({time.monotonic() - started:.1f}s)", flush=True)
        if errors:
            shown = "; ".join(f"{k}: {v}" for k, v in list(errors.items())[:5])
            print(f"classifier: skipped {len(errors)} unreadable image(s): {shown}", flush=True)
        extra.update(segmenter=settings.segmenter, segmenter_version=meta["version"], masks=mask_uri)
    return _run("classifier", settings, checked, train, val, how, extra)
