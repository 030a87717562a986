"""The subgroup section of ``raysky report``: the audit table and a forest plot of malignant AUC
with 95% intervals, as inline SVG (no plotting library, no script), like the reliability
diagram of :mod:`raysky.review.reliability_plot`."""

from __future__ import annotations

import html
import math

from raysky.data.taxonomy import MALIGNANT_CLASSES
from raysky.metrics.intervals import format_interval, group_rows

_POINT, _FLAGGED, _FEW = "#0072B2", "#D55E00", "#999999"  # Okabe-Ito, as elsewhere in the report


def forest_svg(audit: dict, width: int = 620) -> str:
    """Malignant AUC per group as a point with its interval, on an axis from 0.5 (chance) to 1,
    extended down in steps of 0.1 when a group's AUC or interval falls below chance.

    Groups marked ``too_few`` are drawn grey and groups without an AUC are listed without a
    point; flagged groups are orange. The overall figure is a dashed vertical line.
    """
    rows = group_rows(audit)
    label_w, pad, row_h, top = 210, 16, 16, 20
    plot_w = width - label_w - 2 * pad
    height = top + row_h * len(rows) + 30
    # A worse-than-chance group is exactly what a reader must see: clamping it to 0.5 would
    # draw it as merely uninformative.
    drawn = [v for _name, g in rows for v in (g["malignant_auc"].get("value"),
                                              g["malignant_auc"].get("low")) if v is not None]
    lowest = min([0.5, *(math.floor(v * 10) / 10 for v in drawn)])
    ticks = [round(lowest + 0.1 * i, 1) for i in range(round((1.0 - lowest) * 10) + 1)]

    def x(value: float) -> float:
        return label_w + pad + (min(max(value, lowest), 1.0) - lowest) / (1.0 - lowest) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="forest plot of malignant AUC">']
    for tick in ticks:
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 6}" x2="{x(tick):.1f}" '
                     f'y2="{height - 24}" stroke="#eee"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 10}" font-size="10" '
                     f'text-anchor="middle">{tick:.1f}</text>')
    overall = audit["overall"]["malignant_auc"].get("value")
    if overall is not None:
        parts.append(f'<line x1="{x(overall):.1f}" y1="{top - 6}" x2="{x(overall):.1f}" '
                     f'y2="{height - 24}" stroke="#555" stroke-dasharray="4 3"/>')
    for i, (name, group) in enumerate(rows):
        y = top + i * row_h
        auc = group["malignant_auc"]
        color = _FEW if group["too_few"] else _FLAGGED if group.get("flagged") else _POINT
        note = " (too few)" if group["too_few"] else " (flagged)" if group.get("flagged") else ""
        parts.append(f'<text x="{label_w}" y="{y + 4}" font-size="11" text-anchor="end" '
                     f'fill="{color}">{html.escape(name[:34] + note)}</text>')
        if auc.get("value") is None:
            reason = auc.get("reason", "no AUC")
            parts.append(f'<text x="{label_w + pad}" y="{y + 4}" font-size="10" fill="#999">'
                         f"{html.escape(reason)}</text>")
            continue
        if auc.get("low") is not None:
            parts.append(f'<line x1="{x(auc["low"]):.1f}" y1="{y}" x2="{x(auc["high"]):.1f}" '
                         f'y2="{y}" stroke="{color}" stroke-width="2"/>')
        interval = (f", 95% CI {auc['low']:.3f}-{auc['high']:.3f}" if auc.get("low") is not None
                    else "")
        parts.append(f'<circle cx="{x(auc["value"]):.1f}" cy="{y}" r="3.5" fill="{color}">'
                     f"<title>{html.escape(name)}: AUC {auc['value']:.3f}{interval}, "
                     f"n {group['n']}, malignant {group['malignant_n']}</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        reason = (entry or {}).get("reason")
        return f'<td class="muted" title="{html.escape(reason or "")}">-</td>'
    # The text evaluate and the model card print for the same figure.
    value, _, interval = format_interval(entry).partition(" ")
    return f"<td>{value}{f' <small>{interval}</small>' if interval else ''}</td>"


def subgroup_section(audit: dict | None) -> str:
    """The report's subgroup section from ``evaluate``'s ``subgroups`` dict ('' if none)."""
    if not audit:
        return ""
    keys = ("balanced_accuracy", "malignant_auc", "sensitivity", "specificity")
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
    body = []
    for name, group in group_rows(audit):
        notes = ", ".join(n for n, on in (("too few", group["too_few"]),
                                          ("flagged", group.get("flagged"))) if on)
        rank = group.get("rank")
        # Flagged rows are highlighted; too-few rows are greyed, since their figures say little.
        row_class = ("flagged" if group.get("flagged") else "few" if group["too_few"] else "")
        body.append(f'<tr{f" class={row_class}" if row_class else ""}><th class="l">'
                    f"{html.escape(name)}</th><td>{group['n']}</td><td>{group['malignant_n']}"
                    f"</td>{''.join(_cell(group.get(k)) for k in keys)}"
                    f"<td>{'' if rank is None else rank}</td><td class=\"l\">{notes}</td></tr>")
    unavailable = "".join(f"<li>{html.escape(g)}: {html.escape(r)}</li>"
                          for g, r in audit.get("unavailable", {}).items())
    threshold = audit.get("threshold")
    note = (f"Malignant ({', '.join(sorted(MALIGNANT_CLASSES))}) against benign. 95% intervals "
            f"by {audit['resampled_by']}: Wilson on the lesion-clustered effective count for "
            f"sensitivity and specificity, {audit['replicates']} seeded bootstrap replicates "
            "for the others. "
            f"Groups with under {audit['min_per_class']} malignant or benign images are marked "
            f"too few and not ranked; a group is flagged when its sensitivity interval lies "
            f"wholly below the overall sensitivity. "
            + (f"Sensitivity and specificity at the referral threshold {threshold:.4f}."
               if threshold is not None else "No calibrated classifier given: "
               "no referral threshold, so no sensitivity or specificity."))
    return (f'<section id="subgroups"><h2>Subgroups</h2><p class="note">{html.escape(note)}</p>'
            f'<table><tr><th class="l">group</th><th>n</th><th>malignant</th>{head}<th>AUC rank'
            f'</th><th class="l">notes</th></tr>{"".join(body)}</table>'
            + (f'<ul class="note">{unavailable}</ul>' if unavailable else "")
            + f"<h2>Malignant AUC by group</h2>{forest_svg(audit)}</section>")


def robustness_section(report: dict, strips: dict[str, str]) -> str:
    """The report's artefact-robustness section from a ``robustness.json`` dict, with one
    example strip per artefact type (``strips``: type -> image ``data:`` URI)."""
    def fmt(value: float | None, signed: bool = False) -> str:
        return "-" if value is None else f"{value:+.3f}" if signed else f"{value:.3f}"

    def ci(entry: dict) -> str:
        low, high = entry.get("low"), entry.get("high")
        return "" if low is None else f" <small>[{low:+.3f}, {high:+.3f}]</small>"

    rows = []
    for kind, r in report.get("by_artefact", {}).items():
        rows.append(
            f'<tr><th class="l">{html.escape(kind)}</th><td>{r["pairs"]}</td>'
            f"<td>{fmt(r['flip_rate']['value'])}</td>"
            f"<td>{fmt(r['mean_abs_delta_malignant_prob'])}</td>"
            f"<td>{fmt(r['macro_auprc']['delta'], True)}{ci(r['macro_auprc'])}</td>"
            f"<td>{fmt(r['malignant_auc']['delta'], True)}{ci(r['malignant_auc'])}</td>"
            f"<td>{fmt(r['artefact_attention'])}</td><td>{fmt(r['clean_attention_same_pixels'])}"
            f"</td><td>{fmt(r['artefact_area_frac'])}</td></tr>")
    examples = "".join(
        f'<figure><figcaption>{html.escape(kind)}</figcaption><img alt="{html.escape(kind)} '
        f'examples: clean, altered, heatmap" src="{uri}" style="max-width:100%"></figure>'
        for kind, uri in strips.items())
    note = (f"{report.get('images')} images of {html.escape(str(report.get('data')))}"
            f"{' (' + html.escape(str(report['split'])) + ')' if report.get('split') else ''}; "
            f"artefacts pasted outside the lesion using {html.escape(str(report.get('masks')))} "
            "masks. Flip: share of images whose predicted class changed. AUPRC and AUC: altered "
            "minus clean, with paired bootstrap 95% intervals. Attention: the Grad-CAM share on "
            "the artefact's own pixels, beside the clean image's share on the same pixels and "
            "their share of the image.")
    return (f'<section id="robustness"><h2>Robustness to dermoscopic artefacts</h2>'
            f'<p class="note">{note}</p><table><tr><th class="l">artefact</th><th>pairs</th>'
            "<th>flip rate</th><th>mean |&Delta; malignant_prob|</th><th>&Delta; macro AUPRC</th>"
            "<th>&Delta; malignant AUC</th><th>attention</th><th>clean, same pixels</th>"
            f"<th>area</th></tr>{''.join(rows)}</table>{examples}</section>")
