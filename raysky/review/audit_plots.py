"""The subgroup and robustness sections of ``raysky report`` as plain data for the
``subgroups`` and ``robustness`` macros of ``templates/sections.html.j2``: the audit table and
a forest plot of malignant AUC with 95% intervals (inline SVG, no plotting library, no script,
like the reliability diagram of :mod:`raysky.review.reliability_plot`), and the artefact
table with its example strips. Numbers and text here; markup and escaping in the templates."""

from __future__ import annotations

import math
from collections.abc import Callable

from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.intervals import format_interval, group_rows

_POINT, _FLAGGED, _FEW = "#0072B2", "#D55E00", "#999999"  # Okabe-Ito, as elsewhere in the report
_FIGURES = ("balanced_accuracy", "malignant_auc", "sensitivity", "specificity")


def forest_plot(audit: dict, width: int = 620) -> dict:
    """Malignant AUC per group as a point with its interval, on an axis from 0.5 (chance) to 1,
    extended down in steps of 0.1 when a group's AUC or interval falls below chance: the
    pixel geometry and text the ``forest`` macro of ``templates/plots.html.j2`` draws.

    Groups marked ``too_few`` are drawn grey and groups without an AUC are listed without a
    point (``x`` None, with their ``reason``); flagged groups are orange. ``overall_x`` is the
    overall figure's dashed vertical line.
    """
    rows = group_rows(audit)
    label_w, pad, row_h, top = 210, 16, 16, 20
    plot_w = width - label_w - 2 * pad
    # A worse-than-chance group is exactly what a reader must see: clamping it to 0.5 would
    # draw it as merely uninformative.
    drawn = [v for _name, g in rows for v in (g["malignant_auc"].get("value"),
                                              g["malignant_auc"].get("low")) if v is not None]
    lowest = min([0.5, *(math.floor(v * 10) / 10 for v in drawn)])
    ticks = [round(lowest + 0.1 * i, 1) for i in range(round((1.0 - lowest) * 10) + 1)]

    def x(value: float | None) -> float | None:
        if value is None:
            return None
        return label_w + pad + (min(max(value, lowest), 1.0) - lowest) / (1.0 - lowest) * plot_w

    overall = audit["overall"]["malignant_auc"].get("value")
    return {"width": width, "height": top + row_h * len(rows) + 30, "top": top,
            "label_w": label_w, "pad": pad, "ticks": [(t, x(t)) for t in ticks],
            "overall_x": x(overall),
            "rows": [_forest_row(name, group, top + i * row_h, x)
                     for i, (name, group) in enumerate(rows)]}


def _forest_row(name: str, group: dict, y: int,
                x: Callable[[float | None], float | None]) -> dict:
    """One group's line of the forest plot at pixel row ``y``; ``x`` maps an AUC to a column."""
    auc = group["malignant_auc"]
    color = _FEW if group["too_few"] else _FLAGGED if group.get("flagged") else _POINT
    note = " (too few)" if group["too_few"] else " (flagged)" if group.get("flagged") else ""
    row = {"y": y, "color": color, "label": name[:34] + note, "x": x(auc.get("value")),
           "reason": auc.get("reason", "no AUC"), "low_x": None, "high_x": None, "title": ""}
    if row["x"] is not None:
        if auc.get("low") is not None:
            row["low_x"], row["high_x"] = x(auc["low"]), x(auc["high"])
        interval = (f", 95% CI {auc['low']:.3f}-{auc['high']:.3f}" if auc.get("low") is not None
                    else "")
        row["title"] = (f"{name}: AUC {auc['value']:.3f}{interval}, n {group['n']}, "
                        f"malignant {group['malignant_n']}")
    return row


def _cell(entry: dict | None) -> dict:
    """A figure of the table: its value and interval as text, or its reason for having none."""
    if not entry or entry.get("value") is None:
        return {"value": None, "interval": "", "reason": (entry or {}).get("reason") or ""}
    # The text evaluate and the model card print for the same figure.
    value, _, interval = format_interval(entry).partition(" ")
    return {"value": value, "interval": interval, "reason": ""}


def _audit_note(audit: dict) -> str:
    """How the table's figures were computed, said once above it."""
    threshold = audit.get("threshold")
    return (f"Malignant ({', '.join(sorted(MALIGNANT_CLASSES))}) against benign. 95% intervals "
            f"by {audit['resampled_by']}: Wilson on the lesion-clustered effective count for "
            f"sensitivity and specificity, {audit['replicates']} seeded bootstrap replicates "
            "for the others. "
            f"Groups with under {audit['min_per_class']} malignant or benign images are marked "
            f"too few and not ranked; a group is flagged when its sensitivity interval lies "
            f"wholly below the overall sensitivity. "
            + (f"Sensitivity and specificity at the referral threshold {threshold:.4f}."
               if threshold is not None else "No calibrated classifier given: "
               "no referral threshold, so no sensitivity or specificity."))


def subgroup_view(audit: dict | None) -> dict | None:
    """What the report's subgroup section shows, from ``evaluate``'s ``subgroups`` dict (None
    when there is none, so the page leaves the section out)."""
    if not audit:
        return None
    rows = []
    for name, group in group_rows(audit):
        notes = ", ".join(n for n, on in (("too few", group["too_few"]),
                                          ("flagged", group.get("flagged"))) if on)
        # Flagged rows are highlighted; too-few rows are greyed, since their figures say little.
        kind = "flagged" if group.get("flagged") else "few" if group["too_few"] else ""
        rows.append({"name": name, "kind": kind, "n": group["n"],
                     "malignant_n": group["malignant_n"],
                     "cells": [_cell(group.get(k)) for k in _FIGURES],
                     "rank": group.get("rank"), "notes": notes})
    return {"note": _audit_note(audit), "figures": _FIGURES, "rows": rows,
            "unavailable": list(audit.get("unavailable", {}).items()),
            "forest": forest_plot(audit)}


def robustness_view(report: dict, strips: dict[str, str]) -> dict:
    """What the report's artefact-robustness section shows, from a ``robustness.json`` dict,
    with one example strip per artefact type (``strips``: type -> image ``data:`` URI)."""
    def paired(entry: dict) -> dict:
        return {"delta": entry["delta"], "low": entry.get("low"), "high": entry.get("high")}

    rows = [{"kind": kind, "pairs": r["pairs"], "flip_rate": r["flip_rate"]["value"],
             "mean_abs_delta": r["mean_abs_delta_malignant_prob"],
             "macro_auprc": paired(r["macro_auprc"]), "malignant_auc": paired(r["malignant_auc"]),
             "attention": r["artefact_attention"],
             "clean_attention": r["clean_attention_same_pixels"],
             "area": r["artefact_area_frac"]}
            for kind, r in report.get("by_artefact", {}).items()]
    return {"images": report.get("images"), "data": str(report.get("data")),
            "split": str(report["split"]) if report.get("split") else None,
            "masks": str(report.get("masks")), "rows": rows, "examples": list(strips.items())}
