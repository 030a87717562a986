"""Out-of-distribution scores: is this image like the dermoscopy the model was calibrated on?

Three scores are implemented; the checkpoint's record names the one in use, and ``ood_score``
means what that method says (higher: less like the calibration images, always):

* ``imagenet-gate`` (the default since decision offsets; :mod:`raysky.calibration.gate`):
  the dermoscopy gate, on a frozen ImageNet encoder's features rather than the classifier's,
  with per-class thresholds; ``ood_score`` is a distance over its class's threshold, so
  ``ood`` is ``ood_score > 1``.
* ``mahalanobis`` (the default before; Lee et al., 2018): the distance of the image feature (the
  full-image stream's pooled tokens after fusion, see
  :meth:`raysky.models.classifier.DualStreamClassifier.classify_with_features`) to the nearest
  class mean, under one covariance shared by all classes. The covariance is Ledoit-Wolf shrunk,
  since calibration sets hold few images per class next to the feature dimension.
* ``energy`` (Liu et al., 2020): ``-logsumexp(logits)``; needs no statistics but only sees
  what the head makes of the features.

Between the two classifier-feature scores
(``tests/calibration/test_calibration_model.py`` prints both):
on a ``tiny`` model trained on the bundled sample, photos from scikit-image's bundled data set
are told apart from held-out dermoscopy far better by the Mahalanobis distance than by the
energy score; on the real ``lite`` model neither catches most photos (docs/benchmarks.md), which is why
the gate exists. For these two the threshold is the 95th percentile of the in-distribution calibration
scores (for Mahalanobis, out-of-fold distances, as new images would score), so about 5% of
such images are flagged; ``ood`` is advice, never an error.
"""

from __future__ import annotations

import numpy as np

from raysky.jsonable import rounded

# raysky.calibration.gate is imported where an image method needs it: it loads torch, and the
# command line reads METHODS from this module while `raysky --help` runs.

METHODS: tuple[str, ...] = ("imagenet-gate", "mahalanobis", "energy")
DEFAULT_METHOD = "imagenet-gate"
IMAGE_METHODS: tuple[str, ...] = ("imagenet-gate",)
"""Methods that score the images themselves (a second, frozen encoder), not the classifier."""
FLAG_QUANTILE = 0.95
"""Share of in-distribution calibration images left unflagged."""


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """``-logsumexp(logits)`` per row (of the raw logits): higher means less like training."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray) -> dict:
    """Class means and the shrunk shared precision matrix of ``features`` (``[N, D]``).

    Only classes present in ``labels`` (indices) get a mean; ``classes_fitted`` lists them.
    """
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    classes = sorted({int(c) for c in y})
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return {"classes_fitted": classes, "means": means, "precision": precision}


def mahalanobis_scores(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of each feature row to its nearest class mean, under ``precision``."""
    x = np.asarray(features, dtype=np.float64)
    diff = x[:, None, :] - np.asarray(means, dtype=np.float64)[None]
    squared = np.einsum("ncd,de,nce->nc", diff, np.asarray(precision, dtype=np.float64), diff)
    return np.sqrt(np.clip(squared.min(axis=1), 0.0, None))


def fit_ood(features: np.ndarray, logits: np.ndarray, labels: np.ndarray,
            method: str = DEFAULT_METHOD, quantile: float = FLAG_QUANTILE,
            gate: dict | None = None) -> dict:
    """Fit ``method`` on in-distribution data and return its checkpoint record.

    The record holds ``method``, its statistics (JSON lists) and ``threshold``, the
    ``quantile`` of the fitted images' scores (taken at a data point, never between two, so
    at most ``1 - quantile`` of them score above it; Mahalanobis distances are taken
    out-of-fold, 5 folds, so the share holds for new images, not just the fitted ones).
    ``imagenet-gate`` needs ``gate``: ``{"encoder": GateEncoder.record, "features": [N, D]}``
    for the same images (see :func:`raysky.calibration.gate.fit_gate`).
    """
    if method not in METHODS:
        raise ValueError(f"OOD method must be one of {', '.join(METHODS)}, got {method!r}")
    if method in IMAGE_METHODS:
        from raysky.calibration.gate import fit_gate

        if gate is None:
            raise ValueError(f"OOD method {method} needs the gate encoder's features of the "
                             "calibration images (gate=...)")
        return fit_gate(gate["features"], labels, gate["encoder"], quantile)
    record: dict = {"method": method}
    if method == "mahalanobis":
        stats = fit_mahalanobis(features, labels)
        record.update(classes_fitted=stats["classes_fitted"], dim=int(stats["means"].shape[1]),
                      means=rounded(stats["means"]), precision=rounded(stats["precision"]))
        # An image is closer to statistics fitted on itself than a new image of the same
        # kind would be, so the threshold comes from out-of-fold distances.
        scores = _out_of_fold_mahalanobis(features, labels)
    else:
        scores = energy_scores(logits)
    record["threshold"] = float(np.quantile(scores, quantile, method="higher"))
    record["quantile"] = float(quantile)
    return record


def _out_of_fold_mahalanobis(features: np.ndarray, labels: np.ndarray, folds: int = 5,
                             seed: int = 0) -> np.ndarray:
    """Each image's distance under statistics fitted on the other folds (seeded folds)."""
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    scores = np.empty(len(y))
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        stats = fit_mahalanobis(x[~held], y[~held])
        scores[held] = mahalanobis_scores(x[held], stats["means"], stats["precision"])
    return scores


class OODScorer:
    """Scores images with the method and statistics of one checkpoint's OOD record.

    For ``imagenet-gate`` the gate encoder is loaded here, on ``device``, once: its weights
    must match the sha256 in the record, else :class:`raysky.calibration.gate.GateWeightsError`
    (a missing or damaged package file included) stops scoring or serving before it starts.
    """

    def __init__(self, record: dict, device=None):
        self.method = record["method"]
        if self.method not in METHODS:
            raise ValueError(f"unknown OOD method {self.method!r} in the checkpoint's calibration")
        self.threshold = record.get("threshold")
        self.record = record
        self.gate = None
        if self.method == "mahalanobis":
            self.means = np.asarray(record["means"], dtype=np.float64)
            self.precision = np.asarray(record["precision"], dtype=np.float64)
        elif self.method in IMAGE_METHODS:
            from raysky.calibration.gate import GateEncoder

            self.gate = GateEncoder(record["encoder"], device or "cpu")

    @property
    def needs_images(self) -> bool:
        """Whether :meth:`__call__` needs the decoded images (the gate) besides the outputs."""
        return self.gate is not None

    def __call__(self, features: np.ndarray, logits: np.ndarray,
                 images=None) -> np.ndarray:
        """One score per image (higher: less like the calibration images).

        ``images`` (RGB uint8 arrays, any size) are needed by the gate only.
        """
        if self.method == "energy":
            return energy_scores(logits)
        if self.gate is not None:
            from raysky.calibration.gate import gate_scores

            if images is None:
                raise ValueError(f"OOD method {self.method} scores the images: pass images=")
            return gate_scores(self.gate.features(images), self.record)
        return mahalanobis_scores(features, self.means, self.precision)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """``scores > threshold``: the images to treat as out of distribution."""
        return np.asarray(scores, dtype=np.float64) > float(self.threshold)
