"""The per-task figures of ``raysky evaluate``: classification, segmentation and lesion focus.

Each function takes plain arrays (labels, probabilities, masks, focus values) and returns a
JSON-ready dict; the ISIC formulas themselves are in :mod:`raysky.metrics.isic`. Macro
averages are over the defined values only (a class without positives has no AUC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.isic import (
    argmax_strict,
    balanced_accuracy,
    binary_metrics,
    confusion_matrix,
    dice_score,
    jaccard_score,
    thresholded_jaccard,
)
from raysky.results.columns import PROB_PREFIX
from raysky.review.settings import LOW_FOCUS_THRESHOLD


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(labels: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                           malignant_prob: np.ndarray | None = None) -> dict:
    """ISIC Task 3 / 2019 metrics for string labels against ``probs[:, i]`` of ``classes[i]``.

    Returns balanced accuracy (strict argmax: ties count as wrong), accuracy, the macro
    averages of the per-class ``auc``, ``auc_sens_80``, ``ap``, ``sensitivity`` and
    ``specificity`` (ISIC thresholds each class probability at 0.5 for the last two), the
    per-class values with ``support`` and argmax ``recall``, and the argmax confusion matrix
    with a column of ``undecided`` (tied) rows. Labels outside ``classes`` are an error: extend
    ``classes`` with zero-probability columns first (as :func:`raysky.review.evaluate.evaluate_frame` does). With
    ``malignant_prob``, the same binary metrics are given for malignant versus benign.
    """
    classes = list(classes)
    index = {code: i for i, code in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {classes}")
    y = np.array([index[label] for label in labels], dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    per_class = {}
    pred = argmax_strict(probs)
    for i, code in enumerate(classes):
        truth = y == i
        values = binary_metrics(truth, probs[:, i])
        values["recall"] = float((pred[truth] == i).mean()) if truth.any() else float("nan")
        per_class[code] = values
    matrix = confusion_matrix(y, probs, len(classes))
    undecided = [int(((y == i) & (pred < 0)).sum()) for i in range(len(classes))]
    out = {
        "n": int(len(y)),
        "classes": classes,
        "balanced_accuracy": balanced_accuracy(y, probs),
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        **{key: _mean(v[key] for v in per_class.values())
           for key in ("auc", "auc_sens_80", "ap", "sensitivity", "specificity")},
        "per_class": per_class,
        "confusion_matrix": {"classes": classes, "matrix": matrix.tolist(), "undecided": undecided},
    }
    if malignant_prob is not None:
        truth = np.array([label in MALIGNANT_CLASSES for label in labels], dtype=bool)
        out["malignant"] = binary_metrics(truth, np.asarray(malignant_prob, dtype=np.float64))
    return out


def segmentation_metrics(image_ids: Sequence[str], preds: Sequence[np.ndarray],
                         truths: Sequence[np.ndarray]) -> dict:
    """Per-image and mean Dice, Jaccard and ISIC's thresholded Jaccard (0 below 0.65).

    A prediction whose size differs from its ground truth is resized to it (nearest
    neighbour) and counted in ``resized``: results keep masks at the scored image's size,
    which can differ from a mask set distributed at another resolution.
    """
    from PIL import Image

    per_image, resized = [], 0
    for image_id, pred, truth in zip(image_ids, preds, truths, strict=True):
        if pred.shape != truth.shape:
            resized += 1
            pred = np.asarray(Image.fromarray(pred.astype(np.uint8)).resize(
                (truth.shape[1], truth.shape[0]), Image.NEAREST))
        jac = jaccard_score(pred, truth)
        per_image.append({"image_id": image_id, "dice": dice_score(pred, truth), "jaccard": jac,
                          "threshold_jaccard": thresholded_jaccard(jac)})
    return {
        "n": len(per_image),
        **{key: _mean(row[key] for row in per_image)
           for key in ("dice", "jaccard", "threshold_jaccard")},
        "resized": resized,
        "per_image": per_image,
    }


def focus_statistics(focus: Sequence[float], area_frac: Sequence[float] | None = None,
                     correct: Sequence[bool | None] | None = None,
                     low_threshold: float = LOW_FOCUS_THRESHOLD) -> dict:
    """Distribution of ``lesion_focus`` (share of Grad-CAM mass on the lesion mask).

    ``mean_area_frac`` is what a heatmap spread evenly over the image would score, the chance
    level to compare ``mean`` with. With ``correct`` (None where there is no ground truth), the
    mean focus of right and wrong predictions is given too. NaN focus values (no heatmap) are
    counted as ``missing``.
    """
    values = np.asarray(focus, dtype=np.float64)
    valid = ~np.isnan(values)
    v = values[valid]
    out: dict = {"n": int(valid.sum()), "missing": int((~valid).sum()),
                 "low_focus_threshold": float(low_threshold)}
    if v.size:
        q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
        out.update({
            "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
            "p90": float(q[4]), "max": float(v.max()),
            "low_focus": int((v < low_threshold).sum()),
            "low_focus_share": float((v < low_threshold).mean()),
        })
    else:
        out.update({key: float("nan") for key in ("mean", "std", "min", "p10", "p25", "median",
                                                  "p75", "p90", "max", "low_focus_share")})
        out["low_focus"] = 0
    if area_frac is not None:
        areas = np.asarray(area_frac, dtype=np.float64)[valid]
        out["mean_area_frac"] = _mean(areas.tolist())
    if correct is not None:
        known = np.array([c is not None for c in correct])[valid]
        right = np.array([bool(c) for c in correct])[valid]
        out["mean_correct"] = _mean(v[known & right].tolist())
        out["mean_wrong"] = _mean(v[known & ~right].tolist())
    return out


def class_probabilities(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """``[N, C]`` float64 probabilities for ``classes``; a class the model lacks gets zeros."""
    columns = [frame[f"{PROB_PREFIX}{code}"].to_numpy(dtype=np.float64)
               if f"{PROB_PREFIX}{code}" in frame.columns else np.zeros(len(frame))
               for code in classes]
    return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0))
