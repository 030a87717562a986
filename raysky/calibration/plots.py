"""The reliability diagram of ``raysky report``, as inline SVG (no plotting library, no script)."""

from __future__ import annotations

import html
from collections.abc import Sequence

COLORS = ("#D55E00", "#0072B2")  # Okabe-Ito, as in raysky.review.report: before, after


def reliability_svg(curves: Sequence[tuple[str, list[dict], float]], size: int = 340) -> str:
    """Accuracy against confidence per bin, one polyline per ``(name, bins, ece)`` curve.

    ``bins`` are :func:`raysky.review.metrics.reliability_bins` rows; each point's area grows with its
    bin's count, and the diagonal is perfect calibration.
    """
    pad, plot = 44, size - 60
    x0, y0 = pad, 12

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return x0 + conf * plot, y0 + (1 - acc) * plot

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 190}" height="{size}" '
             f'role="img" aria-label="reliability diagram">',
             f'<rect x="{x0}" y="{y0}" width="{plot}" height="{plot}" fill="#fff" stroke="#999"/>']
    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        parts.append(f'<text x="{x0 + t * plot:.1f}" y="{y0 + plot + 14}" font-size="10" '
                     f'text-anchor="middle">{t:.1f}</text>')
        parts.append(f'<text x="{x0 - 4}" y="{y0 + (1 - t) * plot + 3:.1f}" font-size="10" '
                     f'text-anchor="end">{t:.1f}</text>')
    parts.append(f'<line x1="{x0}" y1="{y0 + plot}" x2="{x0 + plot}" y2="{y0}" stroke="#bbb" '
                 f'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x0 + plot / 2}" y="{size - 6}" font-size="11" '
                 f'text-anchor="middle">confidence (top probability)</text>')
    parts.append(f'<text x="12" y="{y0 + plot / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {y0 + plot / 2})">accuracy</text>')
    total = max(1, max((sum(b["n"] for b in bins) for _, bins, _ in curves), default=1))
    for i, (name, bins, ece) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        points = [xy(b["confidence"], b["accuracy"]) for b in bins]
        parts.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                     + f'" fill="none" stroke="{color}" stroke-width="2"/>')
        for (x, y), b in zip(points, bins, strict=True):
            radius = 2.0 + 8.0 * (b["n"] / total) ** 0.5
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{color}" '
                         f'fill-opacity="0.5"><title>{b["n"]} images, confidence '
                         f'{b["confidence"]:.3f}, accuracy {b["accuracy"]:.3f}</title></circle>')
        ly = y0 + 10 + 16 * i
        parts.append(f'<line x1="{x0 + plot + 12}" y1="{ly}" x2="{x0 + plot + 30}" y2="{ly}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{x0 + plot + 34}" y="{ly + 4}" font-size="11">'
                     f'{html.escape(f"{name}  ECE {ece:.3f}")}</text>')
    parts.append("</svg>")
    return "".join(parts)


def reliability_section(calibration: dict | None) -> str:
    """The report's calibration section from ``evaluate``'s ``calibration`` dict ('' if none)."""
    if not calibration:
        return ""
    curves = [(name, calibration[key]["reliability"], calibration[key]["ece"])
              for name, key in (("uncalibrated", "before"), ("calibrated", "after"))
              if calibration.get(key) and calibration[key]["reliability"]]
    if not curves:
        return ""
    note = (f"temperature {calibration['temperature']:.3f}" if calibration.get("temperature")
            else "no temperature known: only the stored probabilities are shown")
    ref = calibration.get("referral")
    referral = ""
    if ref:
        referral = (f" Referral at malignant probability &ge; {_num(ref['threshold'])}: "
                    f"sensitivity {_num(ref['sensitivity'])} (95% CI "
                    f"{_num(ref['sensitivity_ci95'][0])}-{_num(ref['sensitivity_ci95'][1])}), "
                    f"specificity {_num(ref['specificity'])} (95% CI "
                    f"{_num(ref['specificity_ci95'][0])}-{_num(ref['specificity_ci95'][1])}).")
    return (f'<section id="calibration"><h2>Reliability (15 confidence bins)</h2>'
            f'<p class="note">{html.escape(note)}; points sized by images per bin; the dashed '
            f"diagonal is perfect calibration.{referral}</p>{reliability_svg(curves)}</section>")


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
