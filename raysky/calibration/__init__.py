"""Trustworthy screening: calibrated probabilities, a referral decision and an OOD flag.

* :mod:`~raysky.calibration.temperature`: temperature scaling of the classifier's logits;
* :mod:`~raysky.calibration.referral`: the ``malignant_prob`` threshold that reaches a chosen
  sensitivity for malignant lesions;
* :mod:`~raysky.calibration.ood`: an out-of-distribution score and its threshold;
* :mod:`~raysky.calibration.fit`: all three as one record for the checkpoint;
* :mod:`~raysky.calibration.collect`: the classifier's outputs on labelled data, and
  :func:`calibrate_checkpoint`, which writes the calibrated checkpoint version.
"""

from __future__ import annotations

from raysky.calibration.fit import (
    MIN_PER_GROUP,
    NotEnoughCalibrationData,
    calibration_version,
    check_counts,
    fit_calibration,
)

__all__ = ["MIN_PER_GROUP", "NotEnoughCalibrationData", "calibration_version", "check_counts",
           "fit_calibration"]
