"""``raysky evaluate``: score a results table against ground truth, the way ISIC does.

A results table is the Parquet that ``raysky score`` writes (one row per image: ``image_id``,
``status``, ``prob_<class>`` per class, ``malignant_prob``, ``mask_png``, ``lesion_focus`` ...).
Ground truth comes from any layout :func:`raysky.data.readers.read_dataset` reads. Rows are
joined on ``image_id``; rows that failed to score, results without ground truth and ground
truth without results are counted in ``coverage`` and left out of every metric.

Every number follows the ISIC Challenge's scoring code (``isic-challenge-scoring``), and the
output uses its names: ``balanced_accuracy``, ``auc``, ``auc_sens_80``, ``ap``, ``dice``,
``jaccard``, ``threshold_jaccard``. Two deliberate differences, both for ill-defined cases that
ISIC never meets on its own ground truth: a per-class rate or AUC with no positives (or no
negatives) is ``null`` rather than an error or a free 1.0, and macro averages are over the
defined values only.

The work is split by stage: :mod:`raysky.review.inputs` reads and joins,
:mod:`raysky.review.task_metrics` computes the per-task figures,
:mod:`raysky.review.calibration_audit` the calibration and subgroup parts, and
:mod:`raysky.review.output` writes and formats them. This module ties them together:
:func:`evaluate` and :func:`evaluate_frame` are its only public names; the others are imported
from the module that defines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from raysky.calibration.decision import decision_metrics
from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import decode_mask, load_mask
from raysky.data.readers import metadata_frame
from raysky.data.records import DatasetRef, LesionRecord
from raysky.data.splits import read_split
from raysky.data.taxonomy import order_classes
from raysky.results.columns import result_classes
from raysky.results.ground_truth import join_ground_truth
from raysky.review.calibration_audit import (
    calibrated_subgroups,
    calibration_figures,
    checkpoint_calibration_for,
)
from raysky.review.inputs import read_results, results_columns
from raysky.review.settings import LOW_FOCUS_THRESHOLD
from raysky.review.task_metrics import (
    class_probabilities,
    classification_metrics,
    focus_statistics,
    segmentation_metrics,
)


def _load_truth_masks(uris: Sequence[str]) -> list[np.ndarray]:
    # Masks are small and S3 round trips dominate, so a few threads overlap the waits.
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(load_mask, uris))


def evaluate_frame(frame: pd.DataFrame, records: Sequence[LesionRecord],
                   low_focus: float = LOW_FOCUS_THRESHOLD,
                   checkpoint_calibration: dict | None = None, by: Sequence[str] = (),
                   metadata: pd.DataFrame | None = None) -> dict:
    """All metrics for an in-memory results table against ground-truth records (JSON-ready).

    Classification uses the matched ``ok`` rows with a label, segmentation those with a
    ground-truth mask and a ``mask_png``, lesion focus every ``ok`` result. Ground-truth
    classes the model does not predict are added with probability 0, and listed in
    ``classification.classes_not_predicted``. ``calibration`` holds ECE, Brier and referral
    figures (see :func:`raysky.calibration.evaluation.calibration_metrics`);
    ``checkpoint_calibration`` is the classifier checkpoint's calibration record (``{}``
    for a checkpoint without one, None when no checkpoint was given). ``subgroups`` is the
    audit of :func:`raysky.audit.subgroups.subgroup_audit` by sex, age band, site, skin tone
    and the ``by`` columns, taken from the results, the records or ``metadata`` (the dataset's
    metadata table, :func:`raysky.data.readers.metadata_frame`).
    """
    model_classes = result_classes(frame)
    joined, coverage = join_ground_truth(frame, records)
    ok = joined[joined["status"] == "ok"]
    out: dict = {"coverage": coverage, "model_classes": list(model_classes)}

    labelled = ok[ok["label"].notna()]
    if len(labelled):
        classes = order_classes(set(model_classes) | set(labelled["label"]))
        probs = class_probabilities(labelled, classes)
        malignant = (labelled["malignant_prob"].to_numpy(dtype=np.float64)
                     if "malignant_prob" in labelled.columns else None)
        out["classification"] = classification_metrics(
            labelled["label"].tolist(), probs, classes, malignant)
        out["classification"]["classes_not_predicted"] = [
            c for c in classes if c not in model_classes]
        if "predicted_class" in labelled.columns:
            # ISIC's balanced accuracy is of the probabilities' argmax; with a calibration's
            # decision offsets, predicted_class differs from it, and this is its figure.
            out["classification"]["decision"] = decision_metrics(
                labelled["label"].tolist(), labelled["predicted_class"].tolist())
        out["calibration"] = calibration_figures(labelled, classes, probs, checkpoint_calibration)
        out["subgroups"] = calibrated_subgroups(frame, records, checkpoint_calibration, by, metadata)

    segmented = (ok[ok["mask_uri"].notna() & ok["mask_png"].notna()]
                 if "mask_png" in ok.columns else ok.iloc[:0])
    if len(segmented):
        out["segmentation"] = _segmentation_figures(segmented)

    results_ok = frame[frame["status"] == "ok"]
    if "lesion_focus" in results_ok.columns and len(results_ok):
        correct = None
        if len(labelled) and "predicted_class" in results_ok.columns:
            truth_by_id = dict(zip(labelled["image_id"], labelled["label"], strict=True))
            correct = [None if i not in truth_by_id else truth_by_id[i] == p for i, p in
                       zip(results_ok["image_id"], results_ok["predicted_class"], strict=True)]
        out["lesion_focus"] = focus_statistics(
            results_ok["lesion_focus"].to_numpy(dtype=np.float64),
            results_ok["lesion_area_frac"].to_numpy(dtype=np.float64)
            if "lesion_area_frac" in results_ok.columns else None,
            correct, low_focus)
    return out


def _segmentation_figures(segmented: pd.DataFrame) -> dict:
    """Segmentation metrics of the rows with a ``mask_png`` and a ground-truth ``mask_uri``; a
    ``mask_png`` that does not decode is listed under ``undecodable_masks``, not scored."""
    preds, ids, bad = [], [], []
    for image_id, data in zip(segmented["image_id"], segmented["mask_png"], strict=True):
        try:
            preds.append(decode_mask(bytes(data), f"mask_png of {image_id}"))
            ids.append(image_id)
        except ImageDecodeError as exc:
            bad.append({"image_id": image_id, "error": exc.reason})
    truths = _load_truth_masks(segmented.set_index("image_id").loc[ids, "mask_uri"].tolist())
    return {**segmentation_metrics(ids, preds, truths), "undecodable_masks": bad}


def evaluate_against(frame: pd.DataFrame, dataset: DatasetRef,
                     low_focus: float = LOW_FOCUS_THRESHOLD, classifier_uri: str | None = None,
                     by: Sequence[str] = ()) -> tuple[dict, list[LesionRecord]]:
    """:func:`evaluate_frame` of ``frame`` against ``dataset`` (its split, by
    :func:`raysky.data.splits.read_split`), with the calibration of ``classifier_uri`` and the
    dataset's metadata file for ``by``: what ``raysky evaluate`` and the report both compute.
    Returns the metrics and the ground-truth records."""
    records = read_split(dataset)
    calibration = checkpoint_calibration_for(frame, classifier_uri) if classifier_uri else None
    metadata = metadata_frame(dataset.uri, dataset.format, dataset.metadata) if by else None
    return evaluate_frame(frame, records, low_focus, calibration, by, metadata), records


def evaluate(results_uri: str, dataset: DatasetRef, low_focus: float = LOW_FOCUS_THRESHOLD,
             classifier_uri: str | None = None, by: Sequence[str] = ()) -> dict:
    """Read results and ground truth (local or ``s3://``) and compute every metric.

    See :func:`evaluate_frame` for what is computed; the returned dict also records its inputs.
    Heatmaps are not read. ``classifier_uri``, the checkpoint the results were scored with,
    supplies the temperature for the calibration figures before and after, and the referral
    threshold of the subgroup audit; ``by`` adds groupings by metadata columns.
    """
    columns = [name for name in results_columns(results_uri) if name != "heatmap_png"]
    frame = read_results(results_uri, columns)
    metrics, _records = evaluate_against(frame, dataset, low_focus, classifier_uri, by)
    if metrics["coverage"]["matched"] == 0:
        raise ValueError(
            f"no result in {results_uri} matches an image of {dataset.uri} ({dataset.format}); "
            f"examples: results {metrics['coverage']['examples_without_ground_truth'][:3]}, "
            f"ground truth {metrics['coverage']['examples_without_results'][:3]}")
    return {"results": str(results_uri), **dataset.describe(), **metrics}
