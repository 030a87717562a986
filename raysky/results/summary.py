"""The summary ``raysky score`` prints after a run and ``raysky results`` prints on demand:
counts of ok and error rows, error reasons, flags and the top rows by ``malignant_prob``."""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from raysky.results.reader import read

SUMMARY_COLUMNS = ("image_id", "source_uri", "status", "error", "error_kind", "predicted_class",
                   "malignant_prob", "refer", "ood", "skin_tone", "warning", "scored_at")


def summarize(source: str | pd.DataFrame, top: int = 10) -> dict:
    """Counts of ok and error rows, error reasons, warnings, the class distribution and the top
    ``top``.

    ``refer`` and ``ood`` count the ok rows flagged, not flagged and null (no calibration);
    ``skin_tone`` counts the ok rows per ITA category, ``unknown`` where it is null.
    ``transient_errors`` counts the error rows a rerun would retry (``error_kind='transient'``).

    ``source`` is a results URI or a frame from :func:`read`. The top list holds the rows with
    the highest ``malignant_prob``: ``image_id``, ``source_uri``, ``predicted_class`` and
    ``malignant_prob``.
    """
    frame = read(source, list(SUMMARY_COLUMNS)) if isinstance(source, str) else source
    ok = frame[frame["status"] == "ok"]
    errors = frame[frame["status"] != "ok"]
    classes = Counter(ok["predicted_class"].astype(str))
    ranked = ok.sort_values(["malignant_prob", "image_id"], ascending=[False, True]).head(top)
    flags = {name: _flag_counts(ok[name]) for name in ("refer", "ood") if name in ok.columns}
    return {
        "rows": int(len(frame)),
        "ok": int(len(ok)),
        "error": int(len(errors)),
        "error_reasons": dict(Counter(_reason_kind(e) for e in errors["error"]).most_common()),
        **({"warnings": dict(Counter(frame["warning"].dropna().astype(str)).most_common())}
           if "warning" in frame.columns else {}),
        "transient_errors": int((errors["error_kind"] == "transient").sum())
        if "error_kind" in errors.columns else 0,
        "class_counts": dict(sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))),
        **flags,
        **({"skin_tone": dict(Counter(ok["skin_tone"].fillna("unknown").astype(str))
                              .most_common())} if "skin_tone" in ok.columns else {}),
        "top_malignant": [
            {"image_id": r.image_id, "source_uri": r.source_uri,
             "predicted_class": r.predicted_class, "malignant_prob": round(float(r.malignant_prob), 6)}
            for r in ranked.itertuples()
        ],
    }


def _flag_counts(values: pd.Series) -> dict[str, int]:
    """``true``, ``false`` and ``null`` counts of a boolean column with nulls."""
    known = values.dropna().astype(bool)
    return {"true": int(known.sum()), "false": int((~known).sum()),
            "null": int(len(values) - len(known))}


def _reason_kind(error: object) -> str:
    """The stable part of an error message (before any parenthesised detail)."""
    text = "" if error is None or (isinstance(error, float) and math.isnan(error)) else str(error)
    return text.split(" (", 1)[0].strip() or "unknown error"


def format_summary(summary: dict) -> str:
    """Render :func:`summarize` output as the lines printed at the end of a run."""
    lines = [f"rows: {summary['rows']}  ok: {summary['ok']}  error: {summary['error']}"]
    if summary["error_reasons"]:
        reasons = ", ".join(f"{reason} x{n}" for reason, n in summary["error_reasons"].items())
        lines.append(f"errors: {reasons}")
    if summary.get("warnings"):
        lines.append("warnings: " + ", ".join(f"{warning} x{n}"
                                              for warning, n in summary["warnings"].items()))
    if summary.get("transient_errors"):
        lines.append(f"transient errors: {summary['transient_errors']} (run the same command "
                     "again to retry them)")
    if summary["class_counts"]:
        total = max(1, summary["ok"])
        lines.append("predicted classes: " + ", ".join(
            f"{code} {n} ({100 * n / total:.1f}%)" for code, n in summary["class_counts"].items()))
    for name, what in (("refer", "referred"), ("ood", "out of distribution")):
        counts = summary.get(name)
        if counts:
            lines.append(f"{what} ({name}): {counts['true']}  not: {counts['false']}"
                         + (f"  null (no calibration): {counts['null']}" if counts["null"] else ""))
    if summary.get("skin_tone"):
        lines.append("skin tone (ITA): " + ", ".join(
            f"{tone} {n}" for tone, n in summary["skin_tone"].items()))
    if summary["top_malignant"]:
        lines.append(f"top {len(summary['top_malignant'])} by malignant_prob:")
        for rank, row in enumerate(summary["top_malignant"], 1):
            lines.append(f"  {rank:3d}. {row['malignant_prob']:.4f}  {row['predicted_class']:6s} "
                         f"{row['image_id']}  {row['source_uri']}")
    return "\n".join(lines)
