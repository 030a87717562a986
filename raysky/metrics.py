"""Segmentation and classification metrics, with ISIC's definitions.

Training validation, ``raysky evaluate`` and the quality benchmark all call these, so a number
means the same thing wherever it is printed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ISIC_JACCARD_THRESHOLD = 0.65


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    return mask > (127 if mask.dtype == np.uint8 and mask.max(initial=0) > 1 else 0.5)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly (1.0)."""
    p, t = _binary(pred), _binary(truth)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def jaccard_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Jaccard (IoU) of two binary masks; two empty masks give 1.0."""
    p, t = _binary(pred), _binary(truth)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def thresholded_jaccard(jaccard: float, threshold: float = ISIC_JACCARD_THRESHOLD) -> float:
    """ISIC 2018 Task 1's score: a Jaccard under ``threshold`` counts as 0."""
    return float(jaccard) if jaccard >= threshold else 0.0


def segmentation_summary(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean Dice, Jaccard and thresholded Jaccard over paired masks."""
    dice = [dice_score(p, t) for p, t in zip(preds, truths, strict=True)]
    jac = [jaccard_score(p, t) for p, t in zip(preds, truths, strict=True)]
    return {
        "dice": float(np.mean(dice)) if dice else float("nan"),
        "jaccard": float(np.mean(jac)) if jac else float("nan"),
        "threshold_jaccard": float(np.mean([thresholded_jaccard(j) for j in jac])) if jac else float("nan"),
    }


def argmax_strict(probs: np.ndarray) -> np.ndarray:
    """Row-wise argmax where a tie for the maximum yields -1, so ties always count as wrong."""
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.max(axis=1, keepdims=True)
    tied = (probs == top).sum(axis=1) > 1
    pred = probs.argmax(axis=1)
    pred[tied] = -1
    return pred


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall of the argmax prediction over classes present in ``labels``."""
    labels = np.asarray(labels)
    pred = argmax_strict(probs)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def per_class_auc(labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """One-vs-rest ROC AUC per class column; NaN where a class has no positives or no negatives."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    out = []
    for c in range(probs.shape[1]):
        truth = labels == c
        if truth.all() or not truth.any():
            out.append(float("nan"))
        else:
            out.append(float(roc_auc_score(truth, probs[:, c])))
    return out


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean of the defined per-class AUCs."""
    aucs = [a for a in per_class_auc(labels, probs) if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def confusion_matrix(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> np.ndarray:
    """``[true, predicted]`` counts of the strict argmax; tied rows land in no column."""
    pred = argmax_strict(probs)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(np.asarray(labels), pred, strict=True):
        if p >= 0:
            matrix[int(t), int(p)] += 1
    return matrix


def classification_summary(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro AUC and per-class AUC in one dict (JSON-ready)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    aucs = per_class_auc(labels, probs)
    return {
        "accuracy": float((argmax_strict(probs) == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "macro_auc": macro_auc(labels, probs),
        "auc_per_class": {c: a for c, a in zip(classes, aucs, strict=True)},
    }
