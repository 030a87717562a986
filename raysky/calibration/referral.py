"""The referral decision: refer an image when its malignant probability reaches a threshold.

A clinic chooses the sensitivity it needs for malignant lesions (MEL, BCC, AKIEC and, for ISIC
2019 models, SCC: :data:`raysky.data.taxonomy.MALIGNANT_CLASSES`); the threshold is the highest
one that reaches it on labelled calibration data, so as few benign lesions as possible are
referred at that sensitivity.
"""

from __future__ import annotations

import math

import numpy as np

from raysky.metrics.isic import sensitivity_specificity

DEFAULT_SENSITIVITY = 0.95


def refer(malignant_prob: np.ndarray | float, threshold: float) -> np.ndarray | bool:
    """The referral decision: ``malignant_prob >= threshold`` (the threshold itself refers)."""
    if np.ndim(malignant_prob) == 0:
        return bool(float(malignant_prob) >= threshold)
    return np.asarray(malignant_prob, dtype=np.float64) >= threshold


def fit_referral(malignant_prob: np.ndarray, is_malignant: np.ndarray,
                 target_sensitivity: float = DEFAULT_SENSITIVITY) -> dict:
    """The highest threshold whose referrals reach ``target_sensitivity`` on these cases.

    With ``n`` malignant cases, referring at least ``ceil(target * n)`` of them is needed, so
    the threshold is the ``ceil(target * n)``-th highest malignant probability among them;
    ties can only refer more. Returns the record stored in the checkpoint: ``threshold``,
    ``target_sensitivity``, the ``sensitivity`` and ``specificity`` achieved, and the counts.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"the referral sensitivity must be in (0, 1], got {target_sensitivity}")
    scores = np.asarray(malignant_prob, dtype=np.float64)
    truth = np.asarray(is_malignant, dtype=bool)
    if not truth.any():
        raise ValueError("no malignant case to set a referral threshold on")
    ranked = np.sort(scores[truth])[::-1]
    needed = max(1, math.ceil(target_sensitivity * len(ranked) - 1e-9))
    threshold = float(ranked[needed - 1])
    sens, spec = sensitivity_specificity(truth, refer(scores, threshold))
    return {"threshold": threshold, "target_sensitivity": float(target_sensitivity),
            "sensitivity": sens, "specificity": spec, "n_malignant": int(truth.sum()),
            "n_benign": int((~truth).sum())}
