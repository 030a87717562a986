"""Calibration quality of class probabilities: top-label reliability bins, ECE and Brier.

``raysky evaluate``, ``raysky report`` and calibration itself use these, before and after a
temperature, so the figures they print are computed one way.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def reliability_bins(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Top-label reliability: per equal-width confidence bin ``(lo, hi]``, its count, mean
    confidence (the top probability) and accuracy (argmax right). Empty bins are left out."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # A confidence of exactly 0 cannot occur (the top of C >= 2 probabilities is >= 1/C).
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(inside.sum()),
                        "confidence": float(confidence[inside].mean()),
                        "accuracy": float(correct[inside].mean())})
    return out


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE (Guo et al., 2017): the count-weighted mean of ``|accuracy - confidence|``
    over ``bins`` equal-width confidence bins. ``labels`` are class indices into ``probs``."""
    rows = reliability_bins(labels, probs, bins)
    total = sum(row["n"] for row in rows)
    if not total:
        return float("nan")
    return float(sum(row["n"] * abs(row["accuracy"] - row["confidence"]) for row in rows) / total)


def brier_score(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: the mean over images of ``sum_c (p_c - [c == label])^2``."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(probs):
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(labels, dtype=np.int64)] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())
