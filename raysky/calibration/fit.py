"""One calibration record from a classifier's outputs on labelled data.

The record is what ``raysky calibrate`` and the end of classifier training store in the
checkpoint's ``config.json`` as ``calibration``: the temperature, the decision offsets for
balanced accuracy (``decision_offsets``, class name -> offset added to ``logits / T`` for
``predicted_class`` only, and ``decision_rule``, how they were fitted), the referral threshold
with the sensitivity and specificity it reached, the OOD method with its statistics and
threshold, what it was fitted on, and ``version``, a content hash of all of that, so results name exactly
the calibration that produced them (``calibration_version``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from raysky.calibration.decision import describe_decision, fit_decision_rule
from raysky.calibration.ood import DEFAULT_METHOD, fit_ood
from raysky.calibration.referral import DEFAULT_SENSITIVITY, fit_referral
from raysky.calibration.temperature import fit_temperature, nll, softmax
from raysky.data.taxonomy import malignant_indices

MIN_PER_GROUP = 20
"""Fewest malignant, and fewest benign, labelled images a calibration is fitted on."""


class NotEnoughCalibrationData(ValueError):
    """Too few malignant or benign labelled images to fit a calibration on."""


def check_counts(labels: Sequence[int], classes: Sequence[str], source: str = "the data",
                 minimum: int = MIN_PER_GROUP) -> tuple[int, int]:
    """``(malignant, benign)`` counts of ``labels``; raises when either is under ``minimum``."""
    malignant = set(malignant_indices(tuple(classes)))
    n_malignant = sum(1 for label in labels if int(label) in malignant)
    n_benign = len(labels) - n_malignant
    if n_malignant < minimum or n_benign < minimum:
        raise NotEnoughCalibrationData(
            f"{source} has {n_malignant} malignant and {n_benign} benign labelled images; "
            f"calibration needs at least {minimum} of each")
    return n_malignant, n_benign


def calibration_version(record: dict) -> str:
    """``cal-`` and 12 hex digits of the SHA-256 of the record (without its ``version``)."""
    body = {key: value for key, value in record.items() if key != "version"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return f"cal-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def fit_calibration(logits: np.ndarray, features: np.ndarray, labels: Sequence[int],
                    classes: Sequence[str], fitted_on: dict,
                    target_sensitivity: float = DEFAULT_SENSITIVITY,
                    ood_method: str = DEFAULT_METHOD, groups: Sequence[str] | None = None,
                    training_counts: dict[str, int] | None = None,
                    gate: dict | None = None) -> dict:
    """Fit temperature, referral threshold and OOD statistics; return the checkpoint record.

    ``logits`` (``[N, C]``, raw) and ``features`` (``[N, D]``) are the classifier's outputs on
    labelled in-distribution images whose class indices into ``classes`` are ``labels``.
    The referral threshold is set on the calibrated malignant probability, the one scoring
    reports. The decision offsets (:mod:`raysky.calibration.decision`) are fitted on
    ``logits / T``, with ``groups`` (lesion ids, for the cross-fitted choice of variant) and
    ``training_counts`` (the training split's images per class, the prior to correct).
    ``gate`` is what :mod:`raysky.calibration.gate` needs for its OOD method: the gate
    encoder's record and its features of these images. ``fitted_on`` describes the data (``data``, ``format``, ``split``); ``n`` is added.
    Raises :class:`NotEnoughCalibrationData` with the counts when there are under
    :data:`MIN_PER_GROUP` malignant or benign images.
    """
    labels_arr = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    check_counts(labels_arr.tolist(), classes, str(fitted_on.get("data", "the data")))
    temperature = fit_temperature(logits, labels_arr)
    probs = softmax(logits / temperature)
    offsets, rule = fit_decision_rule(logits / temperature, labels_arr, classes, groups,
                                      training_counts)
    malignant = malignant_indices(tuple(classes))
    is_malignant = np.isin(labels_arr, malignant)
    record = {
        "temperature": round(temperature, 6),
        "nll_before": round(nll(logits, labels_arr), 6),
        "nll_after": round(nll(logits, labels_arr, temperature), 6),
        "decision_offsets": offsets,
        "decision_rule": rule,
        "referral": fit_referral(probs[:, malignant].sum(axis=1), is_malignant,
                                 target_sensitivity),
        "ood": fit_ood(features, logits, labels_arr, ood_method, gate=gate),
        "fitted_on": {**fitted_on, "n": int(len(labels_arr))},
    }
    return {"version": calibration_version(record), **record}


def describe_calibration(record: dict) -> str:
    """A few lines on a calibration record, for the terminal: the temperature, referral and
    OOD figures, then the decision offsets (or that none are set)."""
    ref, ood = record["referral"], record["ood"]
    return (f"calibration {record['version']}: temperature {record['temperature']:.3f} (NLL "
            f"{record['nll_before']:.3f} -> {record['nll_after']:.3f}); refer at malignant_prob "
            f">= {ref['threshold']:.4f}: sensitivity {ref['sensitivity']:.3f} (target "
            f"{ref['target_sensitivity']:g}), specificity {ref['specificity']:.3f} on "
            f"{ref['n_malignant']} malignant / {ref['n_benign']} benign; OOD {ood['method']} "
            f"> {ood['threshold']:.4g}; fitted on {record['fitted_on']['n']} images\n"
            f"{describe_decision(record)}")
