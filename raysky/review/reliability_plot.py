"""The reliability diagram of ``raysky report``, as inline SVG (no plotting library, no script)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from raysky.calibration.evaluation import referral_intervals
from raysky.metrics.intervals import format_interval
from raysky.review.svg import UnitSquare

COLORS = ("#D55E00", "#0072B2")  # Okabe-Ito, as in raysky.review.pictures: before, after


def reliability_svg(curves: Sequence[tuple[str, list[dict], float]], size: int = 340) -> str:
    """Accuracy against confidence per bin, one polyline per ``(name, bins, ece)`` curve.

    ``bins`` are :func:`raysky.metrics.reliability.reliability_bins` rows; each point's area grows with its
    bin's count, and the diagonal is perfect calibration.
    """
    square = UnitSquare(size, legend_width=190)
    parts = square.axes("reliability diagram", "confidence (top probability)", "accuracy")
    total = max(1, max((sum(b["n"] for b in bins) for _, bins, _ in curves), default=1))
    for i, (name, bins, ece) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        points = [(square.x(b["confidence"]), square.y(b["accuracy"])) for b in bins]
        parts.append('<polyline points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                     + f'" fill="none" stroke="{color}" stroke-width="2"/>')
        for (x, y), b in zip(points, bins, strict=True):
            radius = 2.0 + 8.0 * (b["n"] / total) ** 0.5
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius:.1f}" fill="{color}" '
                         f'fill-opacity="0.5"><title>{b["n"]} images, confidence '
                         f'{b["confidence"]:.3f}, accuracy {b["accuracy"]:.3f}</title></circle>')
        parts += square.legend(i, color, 2, f"{name}  ECE {ece:.3f}")
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
        sens, spec = referral_intervals(ref)
        referral = (f" Referral at malignant probability &ge; {_num(ref['threshold'])}: "
                    f"sensitivity {format_interval(sens)}, specificity "
                    f"{format_interval(spec)} (95%, {html.escape(ref.get('interval', ''))}).")
    return (f'<section id="calibration"><h2>Reliability (15 confidence bins)</h2>'
            f'<p class="note">{html.escape(note)}; points sized by images per bin; the dashed '
            f"diagonal is perfect calibration.{referral}</p>{reliability_svg(curves)}</section>")


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
