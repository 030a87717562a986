"""The calibration part of ``raysky evaluate``: ECE and Brier before and after, and referral.

Results store calibrated probabilities only (when the classifier had a calibration). The
uncalibrated ones are not stored but recovered: ``softmax(log p * T)`` undoes the temperature
exactly, up to float32 rounding (:func:`raysky.calibration.temperature.uncalibrate`). That
keeps the results schema to what screening needs, and needs only the temperature, which the
checkpoint named by ``--classifier`` holds (its calibration version must match the results').
The same works the other way: uncalibrated results and a calibrated checkpoint give the
calibrated figures, and the referral decisions at its threshold, without scoring again.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raysky.calibration.temperature import recalibrate, uncalibrate
from raysky.metrics.intervals import format_interval, proportion_interval
from raysky.metrics.isic import sensitivity_specificity
from raysky.metrics.reliability import brier_score, expected_calibration_error, reliability_bins


def results_calibration_version(frame) -> str | None:
    """The one calibration version of the results' ok rows, None when uncalibrated.

    Results mixing calibration versions (or calibrated and uncalibrated rows) are refused:
    their probabilities mean different things.
    """
    if "calibration_version" not in frame.columns:
        return None
    values = {None if v is None or v != v else str(v) for v in frame["calibration_version"]}
    if len(values) > 1:
        raise ValueError(f"the results mix calibration versions {sorted(map(str, values))}; "
                         "evaluate each version's rows apart")
    return values.pop() if values else None


def calibration_quality(labels: np.ndarray, probs: np.ndarray) -> dict:
    """ECE (15 bins, top-label), multi-class Brier score and the reliability bins."""
    return {"ece": expected_calibration_error(labels, probs), "brier": brier_score(labels, probs),
            "reliability": reliability_bins(labels, probs)}


def referral_metrics(referred: np.ndarray, is_malignant: np.ndarray, threshold: float | None,
                     lesions: Sequence | None = None) -> dict:
    """Sensitivity and specificity of the referrals, each with a 95% Wilson interval on the
    lesion-clustered effective count (:func:`raysky.metrics.intervals.proportion_interval`):
    the same intervals the subgroup audit's overall row gives for the same decisions."""
    referred = np.asarray(referred, dtype=bool)
    truth = np.asarray(is_malignant, dtype=bool)
    clusters = None if lesions is None else np.asarray(lesions, dtype=object)
    sens, spec = sensitivity_specificity(truth, referred)
    sens_ci = proportion_interval(referred[truth], None if clusters is None else clusters[truth])
    spec_ci = proportion_interval(~referred[~truth],
                                  None if clusters is None else clusters[~truth])
    by = "lesion" if clusters is not None and any(v is not None and v == v for v in clusters) \
        else "image"
    return {"threshold": threshold, "n_malignant": int(truth.sum()), "n_benign": int((~truth).sum()),
            "referred": int(referred.sum()), "sensitivity": sens,
            "sensitivity_ci95": [sens_ci["low"], sens_ci["high"]], "specificity": spec,
            "specificity_ci95": [spec_ci["low"], spec_ci["high"]], "interval": f"wilson, by {by}"}


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, is_malignant: np.ndarray,
                        stored_version: str | None, referred: np.ndarray | None,
                        checkpoint_calibration: dict | None, lesions: Sequence | None = None
                        ) -> dict:
    """Calibration figures for labelled result rows (``labels`` index ``probs`` columns).

    ``stored_version`` is the results' calibration version (None: uncalibrated results);
    ``checkpoint_calibration`` the ``--classifier`` checkpoint's record, if one was given.
    ``before``/``after`` are the uncalibrated and calibrated figures, each null when it
    cannot be had. ``referral`` measures the rows' referral decisions ``referred`` (None: no
    referral figures; see :func:`raysky.review.calibration_audit.referral_decisions`), with
    intervals by ``lesions`` where given.
    """
    record = checkpoint_calibration or None
    if stored_version and record and record.get("version") != stored_version:
        raise ValueError(f"the results were scored with calibration {stored_version}, but "
                         f"checkpoint_calibration has {record.get('version')}; give the "
                         "calibration of the checkpoint the results were scored with")
    if stored_version and record is None and checkpoint_calibration is not None:
        raise ValueError(f"the results were scored with calibration {stored_version}, but "
                         "checkpoint_calibration is empty (a checkpoint without calibration)")
    out: dict = {"calibration_version": stored_version, "temperature": None,
                 "probabilities": "calibrated" if stored_version else "uncalibrated",
                 "before": None, "after": None, "referral": None}
    if stored_version:
        out["after"] = calibration_quality(labels, probs)
        if record:
            out["temperature"] = float(record["temperature"])
            out["before"] = calibration_quality(labels, uncalibrate(probs, out["temperature"]))
    else:
        out["before"] = calibration_quality(labels, probs)
        if record:
            out["temperature"] = float(record["temperature"])
            out["after"] = calibration_quality(labels, recalibrate(probs, out["temperature"]))
            out["calibration_version"] = record.get("version")
    if referred is not None:
        threshold = (record or {}).get("referral", {}).get("threshold")
        out["referral"] = referral_metrics(referred, is_malignant,
                                           None if threshold is None else float(threshold), lesions)
    return out


def format_calibration(section: dict) -> list[str]:
    """Terminal lines for :func:`calibration_metrics`' output."""
    def fmt(part: dict | None, key: str) -> str:
        return "-" if not part or part.get(key) is None else f"{part[key]:.4f}"

    temperature = section.get("temperature")
    lines = ["", f"Calibration ({section['probabilities']} results"
             + (f", {section['calibration_version']}" if section.get("calibration_version") else "")
             + (f", temperature {temperature:.3f}" if temperature else "") + ")",
             f"  ECE (15 bins)  before {fmt(section['before'], 'ece')}  after "
             f"{fmt(section['after'], 'ece')}",
             f"  Brier          before {fmt(section['before'], 'brier')}  after "
             f"{fmt(section['after'], 'brier')}"]
    ref = section.get("referral")
    if ref:
        sens, spec = referral_intervals(ref)
        lines.append(f"  referral: {ref['referred']} referred; sensitivity {format_interval(sens)} "
                     f"on {ref['n_malignant']} malignant, specificity {format_interval(spec)} on "
                     f"{ref['n_benign']} benign (95%, {ref.get('interval', 'wilson')})")
    return lines


def referral_intervals(referral: dict) -> tuple[dict, dict]:
    """The referral's sensitivity and specificity as interval entries (``value``, ``low``,
    ``high``) for :func:`raysky.metrics.intervals.format_interval`."""
    return tuple({"value": referral[name], "low": referral[f"{name}_ci95"][0],
                  "high": referral[f"{name}_ci95"][1]}
                 for name in ("sensitivity", "specificity"))  # type: ignore[return-value]
