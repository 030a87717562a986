"""Segmentation and classification metrics, with ISIC's definitions.

Training validation, ``raysky evaluate``, the subgroup and robustness audits and the quality
benchmark all call these, so a number means the same thing wherever it is printed. Their
confidence intervals are in :mod:`raysky.metrics.intervals`.
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
    """Accuracy, balanced accuracy, macro AUC (``auc``, ISIC's name, as ``raysky evaluate``
    reports it) and per-class AUC in one dict (JSON-ready)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    aucs = per_class_auc(labels, probs)
    return {
        "accuracy": float((argmax_strict(probs) == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": balanced_accuracy(labels, probs),
        "auc": macro_auc(labels, probs),
        "auc_per_class": {c: a for c, a in zip(classes, aucs, strict=True)},
    }


def _binary_truth_defined(truth: np.ndarray) -> bool:
    """A ranking metric needs both positives and negatives."""
    return bool(truth.any() and not truth.all())


def roc_points(truth: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of a binary ROC curve, as ISIC computes it (scikit-learn's)."""
    from sklearn.metrics import roc_curve

    return roc_curve(np.asarray(truth, dtype=bool), np.asarray(scores, dtype=np.float64),
                     drop_intermediate=drop_intermediate)


def auc_above_sensitivity(truth: np.ndarray, scores: np.ndarray, min_sensitivity: float = 0.80) -> float:
    """ISIC's ``auc_sens_80``: the raw partial ROC AUC of the curve where sensitivity >= ``min_sensitivity``.

    The ROC curve is cut where the true-positive rate first reaches ``min_sensitivity``
    (linearly interpolated to start exactly there) and the area under the remaining piece is
    integrated over the false-positive rate, from that point to FPR 1. It is the raw area, not
    McClish-normalised like scikit-learn's ``max_fpr``: a perfect ranking scores 1.0, the worst
    0.0, and chance (the diagonal) 0.18 at the default of 0.8. NaN when ``truth`` lacks
    positives or negatives.
    """
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    truth = np.asarray(truth, dtype=bool)
    if not _binary_truth_defined(truth):
        return float("nan")
    fpr, tpr, _ = roc_points(truth, scores, drop_intermediate=False)
    # tpr is non-decreasing and starts at 0, so the left insertion point is the first ROC point
    # at or above the threshold and index - 1 is a point strictly below it.
    index = int(np.searchsorted(tpr, min_sensitivity, side="left"))
    fpr_at = float(np.interp(min_sensitivity, tpr[index - 1:index + 1], fpr[index - 1:index + 1]))
    seg_tpr = np.concatenate([[min_sensitivity], tpr[index:]])
    seg_fpr = np.concatenate([[fpr_at], fpr[index:]])
    from sklearn.metrics import auc

    return float(auc(seg_fpr, seg_tpr))


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step precision-recall curve); NaN without positives."""
    from sklearn.metrics import average_precision_score

    truth = np.asarray(truth, dtype=bool)
    if not truth.any():
        return float("nan")
    return float(average_precision_score(truth, np.asarray(scores, dtype=np.float64)))


def sensitivity_specificity(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity of binary decisions ``predicted`` against ``truth``.

    The share of true cases predicted positive and of the others predicted negative; the one
    definition for the whole package (ISIC's per-category rates pass ``scores > 0.5``, the
    referral passes its decisions). A rate whose denominator is empty is NaN here, where ISIC
    would count it as a free 1.0.
    """
    truth = np.asarray(truth, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    positives, negatives = truth.sum(), (~truth).sum()
    sens = float((predicted & truth).sum() / positives) if positives else float("nan")
    spec = float((~predicted & ~truth).sum() / negatives) if negatives else float("nan")
    return sens, spec


def rank_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney count, ties counted half, as scikit-learn's; NaN without
    positives or negatives. Fast enough to run a thousand times per bootstrap."""
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # Per positive, the negatives scored below it and those tied with it, by binary search in
    # the sorted negatives: the same sum as ranking, without a full rank transform per replicate.
    negative = np.sort(scores[~truth])
    below = np.searchsorted(negative, scores[truth], side="left")
    tied = np.searchsorted(negative, scores[truth], side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (positives * negatives))


def binary_metrics(truth: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ISIC's per-category numbers for one binary problem: auc, auc_sens_80, ap, sensitivity, specificity.

    ``truth`` is boolean, ``scores`` the predicted probability of the positive class; ISIC
    thresholds it at ``threshold`` (strictly above counts as positive) for the two rates.
    """
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    defined = _binary_truth_defined(truth)
    sens, spec = sensitivity_specificity(truth, scores > threshold)
    return {
        "auc": float(roc_auc_score(truth, scores)) if defined else float("nan"),
        "auc_sens_80": auc_above_sensitivity(truth, scores, 0.80),
        "ap": average_precision(truth, scores),
        "sensitivity": sens,
        "specificity": spec,
        "support": int(truth.sum()),
    }
