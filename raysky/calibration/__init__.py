"""Trustworthy screening: calibrated probabilities, a referral decision and an OOD flag.

* :mod:`~raysky.calibration.temperature`: temperature scaling of the classifier's logits;
* :mod:`~raysky.calibration.referral`: the ``malignant_prob`` threshold that reaches a chosen
  sensitivity for malignant lesions;
* :mod:`~raysky.calibration.ood`: an out-of-distribution score and its threshold (with the
  ImageNet gate of :mod:`~raysky.calibration.gate`);
* :mod:`~raysky.calibration.decision`: the decision offsets for balanced accuracy;
* :mod:`~raysky.calibration.fit`: all of them as one record for the checkpoint;
* :mod:`~raysky.calibration.evaluation`: the figures of a calibration on labelled results.

Primitives only: running a classifier over labelled images to calibrate it is
:mod:`raysky.train.calibrate`. Public names load on first use (:mod:`raysky.exports`).
"""

from __future__ import annotations

from raysky.exports import lazy_exports

_MODULES = {
    "MIN_PER_GROUP": "fit", "NotEnoughCalibrationData": "fit", "calibration_version": "fit",
    "check_counts": "fit", "fit_calibration": "fit", "describe_calibration": "fit",
}
__all__ = sorted(_MODULES)
__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
