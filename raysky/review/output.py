"""What ``raysky evaluate`` prints and writes: the JSON file, the terminal table and the
model-card sections, all from the dict :func:`raysky.review.evaluate.evaluate` returns."""

from __future__ import annotations

import math

from raysky.audit.subgroups import format_subgroups
from raysky.calibration.evaluation import format_calibration
from raysky.jsonable import to_jsonable


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(metrics: dict) -> str:
    """A plain-text summary of :func:`raysky.review.evaluate.evaluate`'s output, for the terminal."""
    cov = metrics["coverage"]
    lines = [f"results {cov['results']}, ground truth {cov['ground_truth']}, matched "
             f"{cov['matched']}, scoring errors {cov['scoring_errors']}, results without "
             f"ground truth {cov['results_without_ground_truth']}, ground truth without "
             f"results {cov['ground_truth_without_results']}"]
    seg = metrics.get("segmentation")
    if seg:
        lines += ["", f"Segmentation ({seg['n']} images)",
                  "  " + "  ".join(f"{k} {_fmt(seg[k])}"
                                   for k in ("dice", "jaccard", "threshold_jaccard"))]
    cls = metrics.get("classification")
    if cls:
        keys = ("auc", "auc_sens_80", "ap", "sensitivity", "specificity", "recall", "support")
        lines += ["", f"Classification ({cls['n']} images)",
                  f"  balanced_accuracy {_fmt(cls['balanced_accuracy'])}  accuracy "
                  f"{_fmt(cls['accuracy'])}  auc {_fmt(cls['auc'])}  auc_sens_80 "
                  f"{_fmt(cls['auc_sens_80'])}  ap {_fmt(cls['ap'])}",
                  *([f"  predicted_class (decision rule): balanced_accuracy "
                     f"{_fmt(cls['decision']['balanced_accuracy'])}  accuracy "
                     f"{_fmt(cls['decision']['accuracy'])}"] if cls.get("decision") else []),
                  "  " + f"{'class':<10}" + "".join(f"{k:>12}" for k in keys)]
        rows = list(cls["per_class"].items())
        if "malignant" in cls:
            rows.append(("malignant", {**cls["malignant"], "recall": None}))
        for code, values in rows:
            lines.append("  " + f"{code:<10}" + "".join(f"{_fmt(values.get(k)):>12}" for k in keys))
        cm = cls["confusion_matrix"]
        lines += ["", "  confusion matrix (rows: truth, columns: prediction)",
                  "  " + f"{'':<10}" + "".join(f"{c:>7}" for c in cm["classes"]) + f"{'tied':>7}"]
        for code, row, tied in zip(cm["classes"], cm["matrix"], cm["undecided"], strict=True):
            lines.append("  " + f"{code:<10}" + "".join(f"{n:>7}" for n in row) + f"{tied:>7}")
    if metrics.get("calibration"):
        lines += format_calibration(metrics["calibration"])
    if metrics.get("subgroups"):
        lines += ["", "Subgroups (malignant vs benign; bootstrap 95% intervals)",
                  *("  " + line for line in format_subgroups(metrics["subgroups"]).splitlines())]
    focus = metrics.get("lesion_focus")
    if focus:
        lines += ["", f"Lesion focus ({focus['n']} explained, {focus['missing']} without heatmap)",
                  f"  mean {_fmt(focus['mean'])}  median {_fmt(focus['median'])}  p10 "
                  f"{_fmt(focus['p10'])}  p90 {_fmt(focus['p90'])}  below "
                  f"{focus['low_focus_threshold']:g}: {focus['low_focus']}"
                  + (f"  chance level (mean lesion area) {_fmt(focus['mean_area_frac'])}"
                     if "mean_area_frac" in focus else "")]
    return "\n".join(lines)


def card_sections(metrics: dict) -> dict[str, dict]:
    """The model-card sections of :func:`raysky.review.evaluate.evaluate`'s output: the
    headline figures (what was evaluated, classification, segmentation and calibration without
    the per-bin details) and the subgroup audit."""
    cls = metrics.get("classification") or {}
    calibration = metrics.get("calibration") or {}
    evaluation = {
        "data": metrics.get("data"), "format": metrics.get("format"), "split": metrics.get("split"),
        "images": metrics.get("coverage", {}).get("matched"),
        "balanced_accuracy": cls.get("balanced_accuracy"),
        # what the served predicted_class scores, with the calibration's decision offsets; the
        # argmax figure above is ISIC's. Left out for results scored without a decision rule.
        **({"balanced_accuracy_predicted_class": cls["decision"].get("balanced_accuracy")}
           if cls.get("decision") else {}),
        "auc": cls.get("auc"),
        "malignant_auc": (cls.get("malignant") or {}).get("auc"),
        "dice": (metrics.get("segmentation") or {}).get("dice"),
        "ece_before": (calibration.get("before") or {}).get("ece"),
        "ece_after": (calibration.get("after") or {}).get("ece"),
        "referral": {k: v for k, v in (calibration.get("referral") or {}).items()
                     if k in ("threshold", "sensitivity", "sensitivity_ci95", "specificity",
                              "specificity_ci95", "n_malignant", "n_benign", "interval")}
                    or None,
    }
    sections = {"evaluation": to_jsonable(evaluation)}
    if metrics.get("subgroups"):
        sections["subgroups"] = to_jsonable(metrics["subgroups"])
    return sections
